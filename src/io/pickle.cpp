#include "io/pickle.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "io/widen.h"
#include "mdd/util/error.h"

namespace mdd {
namespace io {
namespace detail {
namespace {

using Kind = PickleValue::Kind;

// Bounds. The pickle's own length already bounds the work (every opcode consumes >= 1 byte and
// creates <= 1 value); these keep a hostile file from building absurd structures in that budget.
constexpr size_t kMaxStack = size_t(1) << 22;
constexpr size_t kMaxMarks = size_t(1) << 16;
constexpr size_t kMaxMemo = size_t(1) << 24;
constexpr size_t kMaxValues = size_t(1) << 23;  // ~200 bytes each
constexpr size_t kMaxDims = 64;

bool module_in(const std::string& module, std::initializer_list<const char*> list) {
  for (const char* m : list) {
    const size_t n = std::strlen(m);
    if (module.compare(0, n, m) == 0 && (module.size() == n || module[n] == '.')) return true;
  }
  return false;
}

// Modules whose members can reach the OS, the interpreter or arbitrary callables. Referencing any
// of them is refused outright: no legitimate weight file needs them.
bool dangerous_global(const std::string& module, const std::string& name) {
  if (module_in(module, {"os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil",
                         "socket", "ssl", "select", "importlib", "imp", "zipimport", "pkgutil", "runpy", "pickle", "_pickle",
                         "pickletools", "copy", "marshal", "shelve", "dill", "cloudpickle", "joblib", "ctypes", "_ctypes",
                         "cffi", "code", "codeop", "pdb", "bdb", "trace", "profile", "cProfile", "timeit", "pty", "tty",
                         "fcntl", "termios", "resource", "signal", "mmap", "multiprocessing", "concurrent", "threading",
                         "_thread", "asyncio", "webbrowser", "functools", "operator", "_operator", "types", "inspect",
                         "gc", "weakref", "atexit", "site", "sysconfig", "platform", "tempfile", "glob", "io", "_io",
                         "urllib", "http", "ftplib", "smtplib", "telnetlib", "xmlrpc", "requests", "pip", "setuptools",
                         "distutils", "commands", "popen2", "pydoc", "yaml", "_winapi", "msvcrt",
                         "winreg", "torch.hub", "torch.jit", "torch.ops", "torch._ops", "torch.classes", "torch._C",
                         "torch.utils.cpp_extension", "torch.package", "torch.serialization", "numpy.f2py",
                         "numpy.distutils", "numpy.testing", "numpy.ctypeslib", "numpy.lib.npyio"}))
    return true;
  if (module == "torch" && (name == "load" || name == "save" || name == "compile")) return true;
  if (module == "numpy" && (name == "load" || name == "loadtxt" || name == "fromfile" || name == "genfromtxt")) return true;
  if (module == "builtins") {
    // Only inert data types of builtins may be referenced; eval/exec/compile/open/getattr/
    // __import__/globals/type/... are refused.
    static const char* kSafe[] = {"set", "frozenset", "list", "tuple", "dict", "int", "float", "complex", "str", "bytes",
                                  "bytearray", "bool", "slice", "range", "object", "NoneType", "Ellipsis", "NotImplemented"};
    for (const char* s : kSafe)
      if (name == s) return false;
    return true;
  }
  return false;
}

// Classes whose construction by REDUCE is recorded as an inert placeholder (their state is data).
bool data_class(const std::string& q) {
  static const char* kExact[] = {
      "argparse.Namespace", "builtins.slice", "builtins.complex", "builtins.range", "builtins.object", "builtins.int",
      "builtins.float", "builtins.str", "builtins.bool", "torch.device", "torch.dtype", "torch.layout",
      "torch.memory_format", "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
      "numpy.core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "numpy._core.multiarray._reconstruct",
      "decimal.Decimal", "fractions.Fraction", "uuid.UUID", "datetime.datetime", "datetime.date", "datetime.time",
      "datetime.timedelta", "datetime.timezone", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
      "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "enum.Enum"};
  for (const char* e : kExact)
    if (q == e) return true;
  return false;
}

bool is_int(const PickleValue* v) { return v->kind == Kind::Int || v->kind == Kind::Bool; }
int64_t as_int(const PickleValue* v) { return v->kind == Kind::Bool ? int64_t(v->boolean) : v->integer; }

// Storage classes torch.save names in persistent ids, with the element type they hold.
bool storage_dtype(const std::string& q, torch::ScalarType* out) {
  static const std::pair<const char*, torch::ScalarType> kTypes[] = {
      {"FloatStorage", torch::kFloat},       {"DoubleStorage", torch::kDouble},
      {"HalfStorage", torch::kHalf},         {"BFloat16Storage", torch::kBFloat16},
      {"LongStorage", torch::kLong},         {"IntStorage", torch::kInt},
      {"ShortStorage", torch::kShort},       {"CharStorage", torch::kChar},
      {"ByteStorage", torch::kByte},         {"BoolStorage", torch::kBool},
      {"ComplexFloatStorage", torch::kComplexFloat}, {"ComplexDoubleStorage", torch::kComplexDouble},
      {"UntypedStorage", torch::kByte},
  };
  const auto dot = q.rfind('.');
  if (dot == std::string::npos) return false;
  const std::string module = q.substr(0, dot), name = q.substr(dot + 1);
  if (module != "torch" && module != "torch.storage" && module != "torch.cuda") return false;
  for (const auto& t : kTypes)
    if (name == t.first) {
      *out = t.second;
      return true;
    }
  return false;
}

std::string key_of(const PickleValue* k) {
  switch (k->kind) {
    case Kind::Str: return "s" + k->text;
    case Kind::Bytes: return "b" + k->text;
    case Kind::Int: case Kind::Bool: return "i" + std::to_string(as_int(k));  // Python: True == 1
    case Kind::None: return "n";
    default: return {};  // unhashable or identity-hashed: never merged
  }
}

}  // namespace

bool torch_storage_dtype(const std::string& qualified_name, torch::ScalarType* dtype) {
  return storage_dtype(qualified_name, dtype);
}

std::string PickleValue::describe() const {
  switch (kind) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::Str: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::List: return "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global " + text;
    case Kind::Object: return text + " object";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
  }
  return "?";
}

Unpickler::Unpickler(const uint8_t* data, size_t size, std::string what, PersistentLoad persistent_load,
                     uint64_t source_bytes)
    : data_(data), size_(size), what_(std::move(what)), persistent_load_(std::move(persistent_load)),
      limits_(input_limits()) {
  const uint64_t src = source_bytes ? std::min<uint64_t>(source_bytes, size) : uint64_t(size);
  work_budget_ = 64 * src + (uint64_t(64) << 20);
  // A stored pickle creates at most one object per opcode byte; 4 per source byte leaves room and
  // still bounds a compressed pickle by its on-disk size (~200 bytes per object).
  max_values_ = size_t(std::min<uint64_t>(kMaxValues, (uint64_t(1) << 16) + 4 * src));
}

void Unpickler::charge(uint64_t units) {
  work_ += units;
  if (work_ > work_budget_) fail("the pickle asks for far more work than its size justifies (amplification through memo references?)");
}

void Unpickler::fail(const std::string& message) const {
  // Naming the opcode being read lets a user compare the offset with `pickletools.dis` output.
  const char* name = op_pos_ < size_ ? opcode_name(data_[op_pos_]) : nullptr;
  if (name) throw Error(fmt::format("{}: pickle offset {} ({}): {}", what_, op_pos_, name, message));
  throw Error(fmt::format("{}: pickle offset {}: {}", what_, op_pos_, message));
}

PickleValue* Unpickler::make(Kind kind) {
  if (arena_.size() >= max_values_)
    fail(fmt::format("too many objects (more than {} for a pickle of this size in the file)", max_values_));
  arena_.emplace_back();
  arena_.back().kind = kind;
  return &arena_.back();
}

uint8_t Unpickler::read_u8() { return *read_bytes(1); }

const uint8_t* Unpickler::read_bytes(uint64_t n) {
  if (n > size_ - pos_) fail(fmt::format("needs {} bytes but only {} remain (truncated pickle?)", n, size_ - pos_));
  const uint8_t* p = data_ + pos_;
  pos_ += size_t(n);
  return p;
}

std::string Unpickler::read_line() {
  const void* nl = std::memchr(data_ + pos_, '\n', size_ - pos_);
  if (!nl) fail("unterminated text argument");
  const size_t n = size_t(static_cast<const uint8_t*>(nl) - (data_ + pos_));
  std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
  pos_ += n + 1;
  if (!s.empty() && s.back() == '\r') s.pop_back();
  return s;
}

void Unpickler::push(PickleValue* v) {
  if (stack_.size() >= kMaxStack) fail("stack too deep");
  stack_.push_back(v);
}

PickleValue* Unpickler::pop() {
  const size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) fail("stack underflow");
  PickleValue* v = stack_.back();
  stack_.pop_back();
  return v;
}

PickleValue* Unpickler::top() {
  const size_t floor = marks_.empty() ? 0 : marks_.back();
  if (stack_.size() <= floor) fail("stack underflow");
  return stack_.back();
}

std::vector<PickleValue*> Unpickler::pop_mark() {
  if (marks_.empty()) fail("no MARK on the stack");
  const size_t m = marks_.back();
  marks_.pop_back();
  std::vector<PickleValue*> items(stack_.begin() + std::ptrdiff_t(m), stack_.end());
  stack_.resize(m);
  return items;
}

void Unpickler::memo_put(uint64_t index) {
  if (memo_.size() >= kMaxMemo && !memo_.count(index)) fail("memo too large");
  memo_[index] = top();
}

PickleValue* Unpickler::memo_get(uint64_t index) {
  auto it = memo_.find(index);
  if (it == memo_.end()) fail(fmt::format("memo key {} is not defined", index));
  return it->second;
}

PickleValue* Unpickler::make_int(int64_t v) {
  PickleValue* r = make(Kind::Int);
  r->integer = v;
  return r;
}

PickleValue* Unpickler::make_long(const uint8_t* p, uint64_t n) {
  if (n > 8) {
    // Integers beyond int64 are legal Python but never needed for weights: keep them inert.
    PickleValue* r = make(Kind::Object);
    r->text = "builtins.int (beyond 64 bits)";
    return r;
  }
  uint64_t u = 0;
  for (uint64_t i = 0; i < n; ++i) u |= uint64_t(p[i]) << (8 * i);
  if (n > 0 && n < 8 && (p[n - 1] & 0x80)) u |= ~uint64_t(0) << (8 * n);  // sign extension
  int64_t v;
  std::memcpy(&v, &u, 8);
  return make_int(v);
}

PickleValue* Unpickler::make_text(Kind kind, const uint8_t* p, uint64_t n) {
  PickleValue* r = make(kind);
  r->text.assign(reinterpret_cast<const char*>(p), size_t(n));
  return r;
}

PickleValue* Unpickler::global(const std::string& module_in_file, const std::string& name) {
  // Python 2 names map to their Python 3 modules exactly as pickle's fix_imports does.
  std::string module = module_in_file;
  if (module == "__builtin__") module = "builtins";
  if (module == "copy_reg") module = "copyreg";
  if (module.empty() || name.empty() || module.size() > 1024 || name.size() > 1024) fail("malformed GLOBAL");
  charge(module.size() + name.size());
  if (dangerous_global(module, name))
    throw Error(fmt::format("{}: refusing to load: the pickle references '{}.{}', which could execute code. The file "
                            "was not loaded and nothing in it was run. Only tensors, dicts, lists, tuples and plain "
                            "data are accepted",
                            what_, module, name));
  PickleValue* g = make(Kind::Global);
  g->text = module + "." + name;
  return g;
}

PickleValue* Unpickler::rebuild_tensor(const std::vector<PickleValue*>& args, const std::string& fn,
                                       const PickleValue* view_dtype) {
  if (args.size() < 4) fail(fmt::format("{} needs at least 4 arguments, got {}", fn, args.size()));
  charge(args.size());
  PickleValue* st = args[0];
  if (st->kind != Kind::Storage) fail(fmt::format("{}: first argument is a {}, not a storage", fn, st->describe()));
  if (!is_int(args[1])) fail(fmt::format("{}: storage offset is a {}, not an int", fn, args[1]->describe()));
  auto int_tuple = [&](PickleValue* v, const char* what) {
    if (v->kind != Kind::Tuple && v->kind != Kind::List) fail(fmt::format("{}: {} is a {}, not a tuple", fn, what, v->describe()));
    if (v->items.size() > kMaxDims) fail(fmt::format("{}: {} has {} dimensions (at most {})", fn, what, v->items.size(), kMaxDims));
    std::vector<int64_t> out;
    for (PickleValue* d : v->items) {
      if (!is_int(d) || as_int(d) < 0) fail(fmt::format("{}: {} must hold non-negative ints", fn, what));
      out.push_back(as_int(d));
    }
    return out;
  };
  PickleValue* t = make(Kind::Tensor);
  t->storage = st;
  // Elements the storage holds in the tensor's element type: v3 tensors reinterpret the storage's
  // bytes (an UntypedStorage) as the pickled dtype.
  int64_t capacity = st->integer;
  if (view_dtype) {
    if (view_dtype->kind != Kind::Global ||
        !detail::torch_dtype_by_name(view_dtype->text, &t->view_dtype, &t->view_widened))
      fail(fmt::format("{}: unsupported dtype {}", fn, view_dtype->kind == Kind::Global ? view_dtype->text : view_dtype->describe()));
    t->has_view_dtype = true;
    const int64_t esize = t->view_widened.empty() ? int64_t(c10::elementSize(t->view_dtype))
                                                  : int64_t(detail::widened_size(t->view_widened));
    const int64_t bytes = st->integer * int64_t(c10::elementSize(st->dtype));
    if (bytes % esize != 0)
      fail(fmt::format("{}: storage '{}' of {} bytes is not a whole number of {}-byte elements", fn, st->text, bytes, esize));
    capacity = bytes / esize;
  }
  t->offset = as_int(args[1]);
  t->sizes = int_tuple(args[2], "size");
  t->strides = int_tuple(args[3], "stride");
  if (t->sizes.size() != t->strides.size())
    fail(fmt::format("{}: size has {} dims but stride has {}", fn, t->sizes.size(), t->strides.size()));
  if (t->offset < 0) fail(fmt::format("{}: negative storage offset {}", fn, t->offset));
  // The view must lie inside the storage: offset + sum((size_i - 1) * stride_i) < numel, in int64
  // with overflow checks (a hostile size/stride must not wrap around into a "valid" extent).
  bool empty = false;
  for (int64_t s : t->sizes) empty |= (s == 0);
  int64_t numel = 1;
  for (int64_t s : t->sizes)
    if (__builtin_mul_overflow(numel, s, &numel)) fail(fmt::format("{}: element count overflows", fn));
  // The input budget for tensors, views included: a stride-0 view of one stored element can
  // describe terabytes that a converter would then materialise.
  if (uint64_t(numel) > limits_.max_tensor_elements)
    fail(fmt::format("{}: tensor of shape [{}] has {} elements, more than the {} allowed (mdd::io::InputLimits)", fn,
                     fmt::join(t->sizes, ", "), numel, limits_.max_tensor_elements));
  if (!empty && uint64_t(numel) / limits_.max_view_expansion > uint64_t(std::max<int64_t>(capacity, 1)))
    fail(fmt::format("{}: view of shape [{}] repeats the {} elements of storage '{}' more than {}x "
                     "(mdd::io::InputLimits::max_view_expansion)", fn, fmt::join(t->sizes, ", "), capacity, st->text,
                     limits_.max_view_expansion));
  if (empty) {
    if (t->offset > capacity)
      fail(fmt::format("{}: offset {} beyond storage '{}' of {} elements", fn, t->offset, st->text, capacity));
  } else {
    int64_t last = t->offset;
    for (size_t d = 0; d < t->sizes.size(); ++d) {
      int64_t span;
      if (__builtin_mul_overflow(t->sizes[d] - 1, t->strides[d], &span) || __builtin_add_overflow(last, span, &last))
        fail(fmt::format("{}: tensor extent overflows", fn));
    }
    if (last >= capacity)
      fail(fmt::format("{}: tensor of shape [{}] with stride [{}] at offset {} needs element {} but storage '{}' holds only {}",
                       fn, fmt::join(t->sizes, ", "), fmt::join(t->strides, ", "), t->offset, last, st->text, capacity));
  }
  return t;
}

PickleValue* Unpickler::new_object(PickleValue* cls, const std::vector<PickleValue*>& args) {
  if (cls->kind != Kind::Global) fail(fmt::format("NEWOBJ on a {} (expected a class)", cls->describe()));
  const std::string& q = cls->text;
  if (q == "collections.OrderedDict" || q == "builtins.dict" || q == "collections.defaultdict") return make(Kind::Dict);
  if (q == "builtins.list" || q == "builtins.set" || q == "builtins.frozenset") return make(Kind::List);
  charge(args.size());
  PickleValue* o = make(Kind::Object);
  o->text = q;
  o->items = args;
  return o;
}

PickleValue* Unpickler::call(PickleValue* callable, const std::vector<PickleValue*>& args, Op opcode) {
  if (callable->kind != Kind::Global) fail(fmt::format("{} on a {} (only globals can be called)", opcode_name(uint8_t(opcode)), callable->describe()));
  const std::string& q = callable->text;
  // _rebuild_from_type_v2 calls recursively; nesting is bounded so a deep pickle cannot overflow
  // the C++ stack.
  struct DepthGuard {
    int& d;
    explicit DepthGuard(int& depth) : d(depth) { ++d; }
    ~DepthGuard() { --d; }
  } guard(call_depth_);
  if (call_depth_ > 8) fail(fmt::format("calls of '{}' nested too deeply", q));
  charge(args.size() + 1);
  auto arg_count = [&](size_t lo, size_t hi) {
    if (args.size() < lo || args.size() > hi) fail(fmt::format("{} called with {} arguments", q, args.size()));
  };
  if (q == "torch._utils._rebuild_tensor_v2" || q == "torch._utils._rebuild_tensor") return rebuild_tensor(args, q);
  if (q == "torch._utils._rebuild_tensor_v3") {
    // PyTorch 2.x: (storage, offset, size, stride, requires_grad, hooks, dtype[, metadata]) for
    // dtypes without a typed storage class (uint16/32/64, float8, ...).
    arg_count(7, 8);
    return rebuild_tensor(args, q, args[6]);
  }
  if (q == "torch._utils._rebuild_parameter" || q == "torch._utils._rebuild_parameter_with_state") {
    arg_count(1, 4);
    if (args[0]->kind != Kind::Tensor) fail(fmt::format("{}: data is a {}, not a tensor", q, args[0]->describe()));
    return args[0];  // a Parameter is its data; requires_grad and hooks do not matter for weights
  }
  if (q == "torch._tensor._rebuild_from_type_v2" || q == "torch._tensor._rebuild_from_type") {
    // (func, type, args, state): a tensor subclass rebuilt by `func(*args)`; `func` goes through
    // this same allowlist and the subclass type is dropped.
    arg_count(3, 4);
    if (args[2]->kind != Kind::Tuple) fail(fmt::format("{}: args is a {}, not a tuple", q, args[2]->describe()));
    return call(args[0], args[2]->items, opcode);
  }
  if (q.compare(0, 21, "torch._utils._rebuild") == 0)
    throw Error(fmt::format("{}: unsupported tensor kind '{}' (quantized, sparse, meta or device-specific tensors cannot be "
                            "loaded; convert them to dense CPU tensors before saving)",
                            what_, q));
  if (q == "collections.OrderedDict" || q == "builtins.dict" || q == "collections.defaultdict") {
    PickleValue* d = make(Kind::Dict);
    if (q != "collections.defaultdict" && !args.empty()) {
      // OrderedDict([(k, v), ...]) / dict([(k, v), ...])
      if (args.size() != 1 || (args[0]->kind != Kind::List && args[0]->kind != Kind::Tuple)) fail(fmt::format("{}: unsupported arguments", q));
      charge(args[0]->items.size());
      for (PickleValue* kv : args[0]->items) {
        if ((kv->kind != Kind::Tuple && kv->kind != Kind::List) || kv->items.size() != 2) fail(fmt::format("{}: items must be pairs", q));
        set_item(d, kv->items[0], kv->items[1]);
      }
    }
    return d;
  }
  if (q == "builtins.set" || q == "builtins.frozenset" || q == "builtins.list" || q == "builtins.tuple" || q == "torch.Size") {
    arg_count(0, 1);
    PickleValue* l = make(q == "builtins.tuple" || q == "torch.Size" ? Kind::Tuple : Kind::List);
    if (!args.empty()) {
      if (args[0]->kind != Kind::List && args[0]->kind != Kind::Tuple) fail(fmt::format("{}: argument is a {}", q, args[0]->describe()));
      charge(args[0]->items.size());
      l->items = args[0]->items;
    }
    return l;
  }
  if (q == "_codecs.encode") {
    // Protocol-2 pickles of `bytes`: _codecs.encode(latin-1 text, "latin1").
    arg_count(1, 2);
    if (args[0]->kind != Kind::Str) fail("_codecs.encode: argument is not a str");
    PickleValue* b = make(Kind::Bytes);
    const std::string& s = args[0]->text;
    charge(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      const auto c = uint8_t(s[i]);
      if (c < 0x80) b->text.push_back(char(c));
      else if ((c & 0xE0) == 0xC0 && i + 1 < s.size()) b->text.push_back(char(((c & 0x1F) << 6) | (uint8_t(s[++i]) & 0x3F)));
      else fail("_codecs.encode: text is not latin-1");
    }
    return b;
  }
  if (q == "copyreg._reconstructor" || q == "copyreg.__newobj__" || q == "copyreg.__newobj_ex__") {
    if (args.empty()) fail(fmt::format("{} without a class", q));
    return new_object(args[0], std::vector<PickleValue*>(args.begin() + 1, args.end()));
  }
  if (data_class(q)) {
    charge(args.size());
    PickleValue* o = make(Kind::Object);
    o->text = q;
    o->items = args;
    return o;
  }
  throw Error(fmt::format("{}: refusing to load: the pickle calls '{}' ({}), which is not on the allowlist of tensor "
                          "rebuilds and plain data types. The file was not loaded and nothing in it was run",
                          what_, q, opcode_name(uint8_t(opcode))));
}

void Unpickler::set_item(PickleValue* target, PickleValue* key, PickleValue* value) {
  if (target->kind == Kind::Object) {  // inert placeholder of a dict-like class: keep the data
    target->entries.emplace_back(key, value);
    return;
  }
  if (target->kind != Kind::Dict) fail(fmt::format("SETITEM on a {}", target->describe()));
  charge(key->text.size() + 1);
  const std::string k = key_of(key);
  if (!k.empty()) {
    if (!target->index) target->index = std::make_unique<std::unordered_map<std::string, size_t>>();
    auto [it, inserted] = target->index->emplace(k, target->entries.size());
    if (!inserted) {
      target->entries[it->second].second = value;  // Python dict semantics: last write wins
      return;
    }
  }
  target->entries.emplace_back(key, value);
}

void Unpickler::append(PickleValue* target, PickleValue* value) {
  if (target->kind != Kind::List && target->kind != Kind::Object) fail(fmt::format("APPEND on a {}", target->describe()));
  target->items.push_back(value);
}

const char* opcode_name(uint8_t op) {
  switch (static_cast<Op>(op)) {
    case Op::kMark: return "MARK";
    case Op::kStop: return "STOP";
    case Op::kPop: return "POP";
    case Op::kPopMark: return "POP_MARK";
    case Op::kDup: return "DUP";
    case Op::kFloat: return "FLOAT";
    case Op::kInt: return "INT";
    case Op::kBinInt: return "BININT";
    case Op::kBinInt1: return "BININT1";
    case Op::kLong: return "LONG";
    case Op::kBinInt2: return "BININT2";
    case Op::kNone: return "NONE";
    case Op::kPersId: return "PERSID";
    case Op::kBinPersId: return "BINPERSID";
    case Op::kReduce: return "REDUCE";
    case Op::kString: return "STRING";
    case Op::kBinString: return "BINSTRING";
    case Op::kShortBinString: return "SHORT_BINSTRING";
    case Op::kUnicode: return "UNICODE";
    case Op::kBinUnicode: return "BINUNICODE";
    case Op::kAppend: return "APPEND";
    case Op::kBuild: return "BUILD";
    case Op::kGlobal: return "GLOBAL";
    case Op::kDict: return "DICT";
    case Op::kEmptyDict: return "EMPTY_DICT";
    case Op::kAppends: return "APPENDS";
    case Op::kGet: return "GET";
    case Op::kBinGet: return "BINGET";
    case Op::kInst: return "INST";
    case Op::kLongBinGet: return "LONG_BINGET";
    case Op::kList: return "LIST";
    case Op::kEmptyList: return "EMPTY_LIST";
    case Op::kObj: return "OBJ";
    case Op::kPut: return "PUT";
    case Op::kBinPut: return "BINPUT";
    case Op::kLongBinPut: return "LONG_BINPUT";
    case Op::kSetItem: return "SETITEM";
    case Op::kTuple: return "TUPLE";
    case Op::kEmptyTuple: return "EMPTY_TUPLE";
    case Op::kSetItems: return "SETITEMS";
    case Op::kBinFloat: return "BINFLOAT";
    case Op::kProto: return "PROTO";
    case Op::kNewObj: return "NEWOBJ";
    case Op::kExt1: return "EXT1";
    case Op::kExt2: return "EXT2";
    case Op::kExt4: return "EXT4";
    case Op::kTuple1: return "TUPLE1";
    case Op::kTuple2: return "TUPLE2";
    case Op::kTuple3: return "TUPLE3";
    case Op::kNewTrue: return "NEWTRUE";
    case Op::kNewFalse: return "NEWFALSE";
    case Op::kLong1: return "LONG1";
    case Op::kLong4: return "LONG4";
    case Op::kBinBytes: return "BINBYTES";
    case Op::kShortBinBytes: return "SHORT_BINBYTES";
    case Op::kShortBinUnicode: return "SHORT_BINUNICODE";
    case Op::kBinUnicode8: return "BINUNICODE8";
    case Op::kBinBytes8: return "BINBYTES8";
    case Op::kEmptySet: return "EMPTY_SET";
    case Op::kAddItems: return "ADDITEMS";
    case Op::kFrozenSet: return "FROZENSET";
    case Op::kNewObjEx: return "NEWOBJ_EX";
    case Op::kStackGlobal: return "STACK_GLOBAL";
    case Op::kMemoize: return "MEMOIZE";
    case Op::kFrame: return "FRAME";
    case Op::kByteArray8: return "BYTEARRAY8";
    case Op::kNextBuffer: return "NEXT_BUFFER";
    case Op::kReadOnlyBuffer: return "READONLY_BUFFER";
  }
  return nullptr;
}

PickleValue* Unpickler::load() {
  for (;;) {
    if (pos_ >= size_) fail("pickle ends without STOP (truncated?)");
    op_pos_ = pos_;
    const Op op = static_cast<Op>(data_[pos_++]);
    switch (op) {
      case Op::kProto: {
        const uint8_t proto = read_u8();
        if (proto > 5) fail(fmt::format("unsupported pickle protocol {}", int(proto)));
        break;
      }
      case Op::kFrame: read_bytes(8); break;  // a length hint only
      case Op::kStop: {
        PickleValue* root = pop();
        return root;
      }
      case Op::kMark:
        if (marks_.size() >= kMaxMarks) fail("too many nested MARKs");
        marks_.push_back(stack_.size());
        break;
      case Op::kPop: pop(); break;
      case Op::kPopMark: pop_mark(); break;
      case Op::kDup: push(top()); break;
      case Op::kNone: push(make(Kind::None)); break;
      case Op::kNewTrue: case Op::kNewFalse: {
        PickleValue* b = make(Kind::Bool);
        b->boolean = op == Op::kNewTrue;
        push(b);
        break;
      }
      case Op::kInt: {  // text; "01"/"00" are protocol-0 booleans
        const std::string s = read_line();
        if (s == "01" || s == "00") {
          PickleValue* b = make(Kind::Bool);
          b->boolean = s == "01";
          push(b);
          break;
        }
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || *end || errno) fail("malformed INT");
        push(make_int(v));
        break;
      }
      case Op::kLong: {  // text
        std::string s = read_line();
        if (!s.empty() && s.back() == 'L') s.pop_back();
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || *end) fail("malformed LONG");
        if (errno) {
          PickleValue* o = make(Kind::Object);
          o->text = "builtins.int (beyond 64 bits)";
          push(o);
        } else {
          push(make_int(v));
        }
        break;
      }
      case Op::kBinInt: {
        const uint8_t* p = read_bytes(4);
        int32_t v;
        std::memcpy(&v, p, 4);
        push(make_int(v));
        break;
      }
      case Op::kBinInt1: push(make_int(read_u8())); break;
      case Op::kBinInt2: {
        const uint8_t* p = read_bytes(2);
        push(make_int(p[0] | (p[1] << 8)));
        break;
      }
      case Op::kLong1: {
        const uint8_t n = read_u8();
        push(make_long(read_bytes(n), n));
        break;
      }
      case Op::kLong4: {
        const uint8_t* p = read_bytes(4);
        int32_t n;
        std::memcpy(&n, p, 4);
        if (n < 0) fail("negative LONG4 length");
        push(make_long(read_bytes(uint64_t(n)), uint64_t(n)));
        break;
      }
      case Op::kBinFloat: {  // big-endian double
        const uint8_t* p = read_bytes(8);
        uint64_t u = 0;
        for (int i = 0; i < 8; ++i) u = (u << 8) | p[i];
        PickleValue* f = make(Kind::Float);
        std::memcpy(&f->real, &u, 8);
        push(f);
        break;
      }
      case Op::kFloat: {  // text
        const std::string s = read_line();
        char* end = nullptr;
        const double v = std::strtod(s.c_str(), &end);
        if (s.empty() || *end) fail("malformed FLOAT");
        PickleValue* f = make(Kind::Float);
        f->real = v;
        push(f);
        break;
      }
      case Op::kString: {  // quoted repr; kept verbatim without the quotes
        std::string s = read_line();
        if (s.size() < 2 || (s.front() != '\'' && s.front() != '"') || s.back() != s.front()) fail("malformed STRING");
        push(make_text(Kind::Str, reinterpret_cast<const uint8_t*>(s.data()) + 1, s.size() - 2));
        break;
      }
      case Op::kUnicode: {  // raw-unicode-escape; kept verbatim
        const std::string s = read_line();
        push(make_text(Kind::Str, reinterpret_cast<const uint8_t*>(s.data()), s.size()));
        break;
      }
      case Op::kBinString: case Op::kBinUnicode: case Op::kBinBytes: {  // 4-byte length
        const uint8_t* p = read_bytes(4);
        uint32_t n;
        std::memcpy(&n, p, 4);
        if (op == Op::kBinString && int32_t(n) < 0) fail("negative BINSTRING length");
        push(make_text(op == Op::kBinBytes ? Kind::Bytes : Kind::Str, read_bytes(n), n));
        break;
      }
      case Op::kShortBinString: case Op::kShortBinUnicode: case Op::kShortBinBytes: {
        const uint8_t n = read_u8();
        push(make_text(op == Op::kShortBinBytes ? Kind::Bytes : Kind::Str, read_bytes(n), n));
        break;
      }
      case Op::kBinUnicode8: case Op::kBinBytes8: case Op::kByteArray8: {
        uint64_t n;
        std::memcpy(&n, read_bytes(8), 8);
        push(make_text(op == Op::kBinUnicode8 ? Kind::Str : Kind::Bytes, read_bytes(n), n));
        break;
      }
      case Op::kEmptyDict: push(make(Kind::Dict)); break;
      case Op::kEmptyList: push(make(Kind::List)); break;
      case Op::kEmptyTuple: push(make(Kind::Tuple)); break;
      case Op::kEmptySet: push(make(Kind::List)); break;  // sets are kept as lists
      case Op::kDict: {
        auto items = pop_mark();
        if (items.size() % 2) fail("DICT with an odd number of items");
        PickleValue* d = make(Kind::Dict);
        for (size_t i = 0; i < items.size(); i += 2) set_item(d, items[i], items[i + 1]);
        push(d);
        break;
      }
      case Op::kList: case Op::kTuple: case Op::kFrozenSet: {
        auto items = pop_mark();
        PickleValue* l = make(op == Op::kTuple ? Kind::Tuple : Kind::List);
        l->items = std::move(items);
        push(l);
        break;
      }
      case Op::kTuple1: case Op::kTuple2: case Op::kTuple3: {
        const size_t n = size_t(uint8_t(op) - uint8_t(Op::kTuple1) + 1);
        PickleValue* t = make(Kind::Tuple);
        t->items.resize(n);
        for (size_t i = n; i-- > 0;) t->items[i] = pop();
        push(t);
        break;
      }
      case Op::kAppend: {
        PickleValue* v = pop();
        append(top(), v);
        break;
      }
      case Op::kAppends: case Op::kAddItems: {
        auto items = pop_mark();
        PickleValue* target = top();
        for (PickleValue* v : items) append(target, v);
        break;
      }
      case Op::kSetItem: {
        PickleValue* v = pop();
        PickleValue* k = pop();
        set_item(top(), k, v);
        break;
      }
      case Op::kSetItems: {
        auto items = pop_mark();
        if (items.size() % 2) fail("SETITEMS with an odd number of items");
        PickleValue* target = top();
        for (size_t i = 0; i < items.size(); i += 2) set_item(target, items[i], items[i + 1]);
        break;
      }
      case Op::kPut: {  // text index
        const std::string s = read_line();
        char* end = nullptr;
        const unsigned long long i = std::strtoull(s.c_str(), &end, 10);
        if (s.empty() || *end) fail("malformed PUT");
        memo_put(i);
        break;
      }
      case Op::kBinPut: memo_put(read_u8()); break;
      case Op::kLongBinPut: {
        uint32_t i;
        std::memcpy(&i, read_bytes(4), 4);
        memo_put(i);
        break;
      }
      case Op::kMemoize: memo_put(memo_.size()); break;
      case Op::kGet: {  // text index
        const std::string s = read_line();
        char* end = nullptr;
        const unsigned long long i = std::strtoull(s.c_str(), &end, 10);
        if (s.empty() || *end) fail("malformed GET");
        push(memo_get(i));
        break;
      }
      case Op::kBinGet: push(memo_get(read_u8())); break;
      case Op::kLongBinGet: {
        uint32_t i;
        std::memcpy(&i, read_bytes(4), 4);
        push(memo_get(i));
        break;
      }
      case Op::kGlobal: {
        const std::string module = read_line();
        const std::string name = read_line();
        push(global(module, name));
        break;
      }
      case Op::kStackGlobal: {
        PickleValue* name = pop();
        PickleValue* module = pop();
        if (module->kind != Kind::Str || name->kind != Kind::Str) fail("STACK_GLOBAL needs two str");
        push(global(module->text, name->text));
        break;
      }
      case Op::kReduce: {
        PickleValue* args = pop();
        PickleValue* fn = pop();
        if (args->kind != Kind::Tuple) fail(fmt::format("REDUCE arguments are a {}, not a tuple", args->describe()));
        push(call(fn, args->items, op));
        break;
      }
      case Op::kInst: {  // module\nname\n with the arguments above the mark
        const std::string module = read_line();
        const std::string name = read_line();
        auto args = pop_mark();
        push(call(global(module, name), args, op));
        break;
      }
      case Op::kObj: {  // class and arguments above the mark
        auto items = pop_mark();
        if (items.empty()) fail("OBJ without a class");
        push(call(items[0], std::vector<PickleValue*>(items.begin() + 1, items.end()), op));
        break;
      }
      case Op::kNewObj: {
        PickleValue* args = pop();
        PickleValue* cls = pop();
        if (args->kind != Kind::Tuple) fail("NEWOBJ arguments are not a tuple");
        push(new_object(cls, args->items));
        break;
      }
      case Op::kNewObjEx: {
        pop();  // kwargs
        PickleValue* args = pop();
        PickleValue* cls = pop();
        if (args->kind != Kind::Tuple) fail("NEWOBJ_EX arguments are not a tuple");
        push(new_object(cls, args->items));
        break;
      }
      case Op::kBuild: {
        PickleValue* state = pop();
        PickleValue* target = top();
        if (target->kind == Kind::Object) target->state = state;      // inert: stored, nothing runs
        else if (target->kind == Kind::Tensor) { /* Python attributes on a tensor: irrelevant */ }
        else if (target->kind == Kind::Dict && state->kind == Kind::Dict) {
          charge(state->entries.size());
          for (auto& kv : state->entries) set_item(target, kv.first, kv.second);
        } else fail(fmt::format("BUILD on a {}", target->describe()));
        break;
      }
      case Op::kPersId: {  // text
        const std::string s = read_line();
        PickleValue* pid = make(Kind::Str);
        pid->text = s;
        if (!persistent_load_) fail("persistent id without a loader");
        push(persistent_load_(*this, pid));
        break;
      }
      case Op::kBinPersId: {
        PickleValue* pid = pop();
        if (!persistent_load_) fail("persistent id without a loader");
        push(persistent_load_(*this, pid));
        break;
      }
      case Op::kExt1: case Op::kExt2: case Op::kExt4:
        fail("extension-registry opcodes (EXT1/2/4) are not supported");
      case Op::kNextBuffer: case Op::kReadOnlyBuffer:
        fail("out-of-band buffers (NEXT_BUFFER/READONLY_BUFFER) are not supported");
      default:
        fail(fmt::format("unknown pickle opcode 0x{:02x}", unsigned(op)));
    }
  }
}

}  // namespace detail
}  // namespace io
}  // namespace mdd
