#include "mdd/io/torch_checkpoint.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "io/pickle.h"
#include "io/widen.h"
#include "io/safetensors_internal.h"
#include "io/zip_reader.h"
#include "mdd/io/weight_entry.h"
#include "mdd/util/error.h"
#include "util/file_util.h"

namespace mdd {
namespace io {

namespace {

using detail::PickleValue;
using Kind = PickleValue::Kind;

// A torch.save file before PyTorch 1.6 (or with _use_new_zipfile_serialization=False) starts with a
// protocol-2 pickle of the magic number 0x1950a86a20f9469cfc6c.
bool is_legacy_torch_file(const uint8_t* p, size_t n) {
  static const uint8_t kMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  return n >= sizeof(kMagic) && std::memcmp(p, kMagic, sizeof(kMagic)) == 0;
}

bool is_zip(const uint8_t* p, size_t n) {
  return n >= 4 && p[0] == 'P' && p[1] == 'K' && ((p[2] == 3 && p[3] == 4) || (p[2] == 5 && p[3] == 6));
}

struct StorageRecord {
  std::string key;
  const detail::ZipEntry* entry = nullptr;
  torch::ScalarType dtype = torch::kByte;
  int64_t numel = 0;
  PickleValue* value = nullptr;
  torch::Tensor data;  // 1-D, `dtype`, materialised on demand
};

// Flattens nested dicts into dotted keys; only tensor leaves are kept.
class Flattener {
 public:
  // `budget` bounds the entries visited and `name_budget` the bytes of dotted names built, both
  // linear in the pickle size: shared sub-dicts must not make flattening exponential.
  Flattener(const std::string& what, size_t budget, uint64_t name_budget) : what_(what), budget_(budget), name_budget_(name_budget) {}
  std::map<std::string, const PickleValue*> out;

  void run(const PickleValue* dict, const std::string& prefix) {
    if (path_.count(dict)) throw Error(fmt::format("{}: the dict under '{}' contains itself (cyclic pickle)", what_, prefix));
    if (path_.size() >= 64) throw Error(fmt::format("{}: dicts nested deeper than 64 levels at '{}'", what_, prefix));
    path_.insert(dict);
    for (const auto& [k, v] : dict->entries) {
      if (budget_-- == 0) throw Error(fmt::format("{}: too many dict entries to flatten (shared sub-dicts?)", what_));
      std::string key;
      if (k->kind == Kind::Str) key = k->text;
      else if (k->kind == Kind::Int) key = std::to_string(k->integer);  // e.g. optimizer state {0: {...}}
      else continue;
      std::string name = prefix.empty() ? key : prefix + "." + key;
      if (name.size() > name_budget_) throw Error(fmt::format("{}: flattened key names exceed the size budget (shared sub-dicts?)", what_));
      name_budget_ -= name.size();
      if (v->kind == Kind::Tensor) {
        if (!out.emplace(name, v).second)
          throw Error(fmt::format("{}: key '{}' occurs twice after flattening nested dicts", what_, name));
      } else if (v->kind == Kind::Dict) {
        run(v, name);
      }  // other leaves (numbers, strings, placeholders such as argparse.Namespace) carry no weights
    }
    path_.erase(dict);
  }

 private:
  const std::string& what_;
  size_t budget_;
  uint64_t name_budget_;
  std::unordered_set<const PickleValue*> path_;
};

const PickleValue* dict_get(const PickleValue* dict, const std::string& key) {
  for (const auto& [k, v] : dict->entries)
    if (k->kind == Kind::Str && k->text == key) return v;
  return nullptr;
}

// Phase 1: the checks that tell a torch.save archive from other zips. Returns the one folder every
// record lives under (<prefix>/data.pkl, <prefix>/data/<key>).
std::string archive_prefix(const detail::ZipReader& zip, const std::string& path) {
  std::string prefix;
  int found = 0;
  for (const auto& [name, e] : zip.entries()) {
    const auto slash = name.find('/');
    if (slash != std::string::npos && name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      prefix = name.substr(0, slash);
      ++found;
    }
  }
  if (found != 1)
    throw Error(fmt::format("{}: {} (expected exactly one '<archive>/data.pkl')", path,
                            found == 0 ? "not a torch.save archive: no data.pkl record" : "several data.pkl records"));
  if (zip.find(prefix + "/constants.pkl"))
    throw Error(fmt::format("{}: this is a TorchScript archive (torch.jit.save), not a torch.save checkpoint; save "
                            "model.state_dict() with torch.save instead",
                            path));
  if (const auto* bo = zip.find(prefix + "/byteorder")) {
    const auto t = zip.read(*bo);
    const std::string order(reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), size_t(t.numel()));
    if (order != "little")
      throw Error(fmt::format("{}: byte order '{}' is not supported (only little-endian checkpoints)", path, order));
  }
  return prefix;
}

// Phase 2: the storages the pickle names through persistent ids. `load` is the unpickler's
// persistent_load: ('storage', storage_type, key, location, numel) -> a Storage value; a key seen
// twice returns the same value, so views of one storage share memory as they do in PyTorch.
class StorageTable {
 public:
  StorageTable(const detail::ZipReader& zip, std::string prefix) : zip_(zip), prefix_(std::move(prefix)) {}
  std::vector<StorageRecord> records;

  PickleValue* load(detail::Unpickler& up, PickleValue* pid) {
    if (pid->kind != Kind::Tuple || pid->items.size() != 5 || pid->items[0]->kind != Kind::Str ||
        pid->items[0]->text != "storage")
      up.fail(fmt::format("unsupported persistent id (a {}; expected ('storage', type, key, location, numel))", pid->describe()));
    PickleValue* type = pid->items[1];
    PickleValue* key = pid->items[2];
    PickleValue* numel = pid->items[4];
    torch::ScalarType dtype;
    if (type->kind != Kind::Global || !detail::torch_storage_dtype(type->text, &dtype))
      up.fail(fmt::format("persistent id names {} instead of a torch storage class", type->describe()));
    if (key->kind != Kind::Str) up.fail("storage key is not a str");
    up.charge(key->text.size());
    if (numel->kind != Kind::Int || numel->integer < 0) up.fail(fmt::format("storage '{}' has an invalid element count", key->text));
    auto it = by_key_.find(key->text);
    if (it != by_key_.end()) {
      const StorageRecord& r = records[it->second];
      if (r.dtype != dtype || r.numel != numel->integer)
        up.fail(fmt::format("storage '{}' is referenced with two different types or sizes", key->text));
      return r.value;
    }
    const std::string record = prefix_ + "/data/" + key->text;
    const detail::ZipEntry* e = zip_.find(record);
    if (!e) up.fail(fmt::format("storage key '{}' has no record '{}' in the archive", key->text, record));
    const uint64_t esize = uint64_t(c10::elementSize(dtype));
    if (uint64_t(numel->integer) > e->size / esize || uint64_t(numel->integer) * esize != e->size)
      up.fail(fmt::format("storage '{}' claims {} elements of {} bytes but its record holds {} bytes", key->text,
                          numel->integer, esize, e->size));
    PickleValue* v = up.make(Kind::Storage);
    v->text = key->text;
    v->dtype = dtype;
    v->integer = numel->integer;
    v->storage_id = int64_t(records.size());
    StorageRecord r;
    r.key = key->text;
    r.entry = e;
    r.dtype = dtype;
    r.numel = numel->integer;
    r.value = v;
    by_key_.emplace(r.key, records.size());
    records.push_back(std::move(r));
    return v;
  }

 private:
  const detail::ZipReader& zip_;
  std::string prefix_;
  std::unordered_map<std::string, size_t> by_key_;
};

// Phase 3: the dict whose tensors are returned, by the shared entry rule (weight_entry.h): a named
// entry must exist and be a dict; "" takes the first default entry present, else the root itself.
const PickleValue* select_entry(const PickleValue* root, const std::string& entry, const std::string& path) {
  if (root->kind != Kind::Dict) {
    if (root->kind == Kind::Tensor)
      throw Error(fmt::format("{}: holds a single tensor, not a dict of named tensors (a state_dict)", path));
    throw Error(fmt::format("{}: holds a pickled {}, not a dict of tensors; save model.state_dict() instead", path, root->describe()));
  }
  auto is_sub_dict = [&](const std::string& name) {
    const PickleValue* v = dict_get(root, name);
    return v && v->kind == Kind::Dict;
  };
  if (entry.empty()) {
    const std::string chosen = default_weight_entry(is_sub_dict);
    return chosen.empty() ? root : dict_get(root, chosen);
  }
  const PickleValue* chosen = dict_get(root, entry);
  if (!chosen) {
    std::vector<std::string> names;
    for (const auto& [k, v] : root->entries)
      if (k->kind == Kind::Str && v->kind == Kind::Dict) names.push_back("'" + k->text + "'");
    throw Error(fmt::format("{}: entry '{}' not found; {}", path, entry,
                            names.empty() ? fmt::format("the file is a plain state_dict of {} entries (use entry \"\")",
                                                        root->entries.size())
                                          : fmt::format("available entries: {}", fmt::join(names, ", "))));
  }
  if (chosen->kind != Kind::Dict)
    throw Error(fmt::format("{}: entry '{}' is a {}, not a dict of tensors", path, entry, chosen->describe()));
  return chosen;
}

// Phase 5: reads the storages the flattened tensors use. STORED records become views into the file
// buffer without a copy; when the used storages take less than half the file (e.g. "ema" out of
// {model, ema, opt}) they are copied instead so the rest of the file can be freed.
void read_used_storages(const detail::ZipReader& zip, std::vector<StorageRecord>& storages,
                        const std::map<std::string, const PickleValue*>& tensors, uint64_t file_size,
                        const std::string& path) {
  std::vector<size_t> used;
  uint64_t used_bytes = 0;
  for (const auto& [name, t] : tensors) {
    StorageRecord& r = storages[size_t(t->storage->storage_id)];
    if (!r.data.defined()) {
      r.data = torch::empty({0}, r.dtype);  // placeholder marks "used" until filled below
      used.push_back(size_t(t->storage->storage_id));
      used_bytes += r.entry->size;
    }
  }
  const bool compact = used_bytes * 2 < file_size;
  for (size_t id : used) {
    StorageRecord& r = storages[id];
    const torch::Tensor raw = zip.read(*r.entry);
    const uint8_t* p = raw.data_ptr<uint8_t>();
    const size_t esize = c10::elementSize(r.dtype);
    if (r.dtype == torch::kBool)
      for (int64_t i = 0; i < r.numel; ++i)
        if (p[i] > 1) throw Error(fmt::format("{}: bool storage '{}' holds byte {} (only 0/1 allowed)", path, r.key, int(p[i])));
    const bool aliases_file = r.entry->method == 0;
    if (aliases_file && !compact && reinterpret_cast<uintptr_t>(p) % esize == 0 && r.numel > 0) {
      r.data = torch::from_blob(const_cast<uint8_t*>(p), {r.numel}, [keep = raw](void*) {}, torch::TensorOptions().dtype(r.dtype));
    } else {
      r.data = torch::empty({r.numel}, r.dtype);
      if (r.numel > 0) std::memcpy(r.data.data_ptr(), p, size_t(r.numel) * esize);
    }
  }
}

// Phase 6: the named tensors as strided views of their storages. PyTorch 2.x v3 tensors reinterpret
// a storage's bytes as their own dtype; one 1-D tensor per (storage, dtype) keeps views of one
// storage sharing memory.
TensorMap build_tensors(const std::vector<StorageRecord>& storages,
                        const std::map<std::string, const PickleValue*>& tensors, const std::string& path) {
  std::map<std::pair<int64_t, std::string>, torch::Tensor> reinterpreted;
  auto as_view_dtype = [&](const PickleValue* t, const std::string& name) -> const torch::Tensor& {
    const StorageRecord& r = storages[size_t(t->storage->storage_id)];
    const std::string tag = t->view_widened.empty() ? c10::toString(t->view_dtype) : t->view_widened;
    auto key = std::make_pair(t->storage->storage_id, tag);
    auto it = reinterpreted.find(key);
    if (it != reinterpreted.end()) return it->second;
    const auto* p = static_cast<const uint8_t*>(r.data.data_ptr());
    const int64_t bytes = r.numel * int64_t(c10::elementSize(r.dtype));
    torch::Tensor out;
    if (!t->view_widened.empty()) {
      const int64_t n = bytes / int64_t(detail::widened_size(t->view_widened));
      out = detail::decode_widened(t->view_widened, p, n, {n}, path, name);
    } else {
      const int64_t n = bytes / int64_t(c10::elementSize(t->view_dtype));
      if (t->view_dtype == torch::kBool)
        for (int64_t i = 0; i < n; ++i)
          if (p[i] > 1) throw Error(fmt::format("{}: bool tensor '{}' holds byte {} (only 0/1 allowed)", path, name, int(p[i])));
      out = torch::empty({n}, t->view_dtype);
      if (n > 0) std::memcpy(out.data_ptr(), p, size_t(bytes));
    }
    return reinterpreted.emplace(key, std::move(out)).first->second;
  };
  TensorMap result;
  for (const auto& [name, t] : tensors) {
    const StorageRecord& r = storages[size_t(t->storage->storage_id)];
    const torch::Tensor& base = t->has_view_dtype ? as_view_dtype(t, name) : r.data;
    result.emplace(name, base.as_strided(t->sizes, t->strides, t->offset));
  }
  return result;
}

TensorMap load_checkpoint_buffer(const torch::Tensor& bytes, const std::string& path, const std::string& entry) {
  const auto* base = bytes.data_ptr<uint8_t>();
  const size_t size = size_t(bytes.numel());
  if (is_legacy_torch_file(base, size))
    throw Error(fmt::format("{}: legacy torch.save format (PyTorch < 1.6 or _use_new_zipfile_serialization=False) is not "
                            "supported; re-save it with torch.save(obj, path) in PyTorch >= 1.6, or convert it to "
                            "safetensors",
                            path));
  if (!is_zip(base, size))
    throw Error(fmt::format("{}: not a torch.save checkpoint (no zip signature; file truncated or of another format)", path));
  const detail::ZipReader zip(bytes, path);
  const std::string prefix = archive_prefix(zip, path);

  // Phase 2-3: unpickle data.pkl (nothing in it runs) and choose the entry.
  const auto* pkl_entry = zip.find(prefix + "/data.pkl");
  const torch::Tensor pkl = zip.read(*pkl_entry);
  StorageTable storages(zip, prefix);
  detail::Unpickler unpickler(pkl.data_ptr<uint8_t>(), size_t(pkl.numel()), fmt::format("{} ({}/data.pkl)", path, prefix),
                              [&](detail::Unpickler& up, PickleValue* pid) { return storages.load(up, pid); },
                              pkl_entry->compressed_size);
  const PickleValue* chosen = select_entry(unpickler.load(), entry, path);

  // Phase 4: dotted names for the tensor leaves. Budgets scale with what the pickle occupies in the
  // file (see Unpickler).
  const uint64_t pkl_size = std::min<uint64_t>(uint64_t(pkl.numel()), std::max<uint64_t>(pkl_entry->compressed_size, 1));
  Flattener flat(path, size_t(4 * pkl_size + 1024), 64 * pkl_size + (uint64_t(16) << 20));
  flat.run(chosen, "");

  read_used_storages(zip, storages.records, flat.out, uint64_t(size), path);
  return build_tensors(storages.records, flat.out, path);
}

}  // namespace

TensorMap load_torch_checkpoint(const std::string& path, const std::string& entry) {
  return load_checkpoint_buffer(read_file_bytes(path), path, entry);
}

TensorMap load_weights(const std::string& path) {
  const torch::Tensor bytes = read_file_bytes(path);
  const auto* p = bytes.data_ptr<uint8_t>();
  const size_t n = size_t(bytes.numel());
  if (is_zip(p, n) || is_legacy_torch_file(p, n)) return load_checkpoint_buffer(bytes, path, "");
  // safetensors: 8-byte little-endian header length, then a JSON object.
  if (n >= 9) {
    uint64_t header_len;
    std::memcpy(&header_len, p, 8);
    if (header_len <= n - 8 && header_len >= 2 && p[8] == '{') return parse_safetensors_buffer(bytes, path).tensors;
  }
  throw Error(fmt::format("{}: unrecognised weight file format (neither a torch.save zip checkpoint nor safetensors)", path));
}

}  // namespace io
}  // namespace mdd
