#pragma once
// Internal: a restricted, bounded Python unpickler for the data.pkl of torch.save archives.
// It builds an inert value tree; nothing in the pickle is ever executed. Not installed.
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "mdd/io/input_limits.h"

namespace mdd {
namespace io {
namespace detail {

/// Pickle opcodes (protocols 0-5), named as in CPython's pickle module.
enum class Op : uint8_t {
  kMark = '(',  ///< MARK
  kStop = '.',  ///< STOP
  kPop = '0',  ///< POP
  kPopMark = '1',  ///< POP_MARK
  kDup = '2',  ///< DUP
  kFloat = 'F',  ///< FLOAT
  kInt = 'I',  ///< INT
  kBinInt = 'J',  ///< BININT
  kBinInt1 = 'K',  ///< BININT1
  kLong = 'L',  ///< LONG
  kBinInt2 = 'M',  ///< BININT2
  kNone = 'N',  ///< NONE
  kPersId = 'P',  ///< PERSID
  kBinPersId = 'Q',  ///< BINPERSID
  kReduce = 'R',  ///< REDUCE
  kString = 'S',  ///< STRING
  kBinString = 'T',  ///< BINSTRING
  kShortBinString = 'U',  ///< SHORT_BINSTRING
  kUnicode = 'V',  ///< UNICODE
  kBinUnicode = 'X',  ///< BINUNICODE
  kAppend = 'a',  ///< APPEND
  kBuild = 'b',  ///< BUILD
  kGlobal = 'c',  ///< GLOBAL
  kDict = 'd',  ///< DICT
  kEmptyDict = '}',  ///< EMPTY_DICT
  kAppends = 'e',  ///< APPENDS
  kGet = 'g',  ///< GET
  kBinGet = 'h',  ///< BINGET
  kInst = 'i',  ///< INST
  kLongBinGet = 'j',  ///< LONG_BINGET
  kList = 'l',  ///< LIST
  kEmptyList = ']',  ///< EMPTY_LIST
  kObj = 'o',  ///< OBJ
  kPut = 'p',  ///< PUT
  kBinPut = 'q',  ///< BINPUT
  kLongBinPut = 'r',  ///< LONG_BINPUT
  kSetItem = 's',  ///< SETITEM
  kTuple = 't',  ///< TUPLE
  kEmptyTuple = ')',  ///< EMPTY_TUPLE
  kSetItems = 'u',  ///< SETITEMS
  kBinFloat = 'G',  ///< BINFLOAT
  kProto = 0x80,  ///< PROTO
  kNewObj = 0x81,  ///< NEWOBJ
  kExt1 = 0x82,  ///< EXT1
  kExt2 = 0x83,  ///< EXT2
  kExt4 = 0x84,  ///< EXT4
  kTuple1 = 0x85,  ///< TUPLE1
  kTuple2 = 0x86,  ///< TUPLE2
  kTuple3 = 0x87,  ///< TUPLE3
  kNewTrue = 0x88,  ///< NEWTRUE
  kNewFalse = 0x89,  ///< NEWFALSE
  kLong1 = 0x8a,  ///< LONG1
  kLong4 = 0x8b,  ///< LONG4
  kBinBytes = 'B',  ///< BINBYTES
  kShortBinBytes = 'C',  ///< SHORT_BINBYTES
  kShortBinUnicode = 0x8c,  ///< SHORT_BINUNICODE
  kBinUnicode8 = 0x8d,  ///< BINUNICODE8
  kBinBytes8 = 0x8e,  ///< BINBYTES8
  kEmptySet = 0x8f,  ///< EMPTY_SET
  kAddItems = 0x90,  ///< ADDITEMS
  kFrozenSet = 0x91,  ///< FROZENSET
  kNewObjEx = 0x92,  ///< NEWOBJ_EX
  kStackGlobal = 0x93,  ///< STACK_GLOBAL
  kMemoize = 0x94,  ///< MEMOIZE
  kFrame = 0x95,  ///< FRAME
  kByteArray8 = 0x96,  ///< BYTEARRAY8
  kNextBuffer = 0x97,  ///< NEXT_BUFFER
  kReadOnlyBuffer = 0x98,  ///< READONLY_BUFFER
};

/// CPython's name of `op` ("REDUCE", ...), or nullptr for a byte that is no opcode.
const char* opcode_name(uint8_t op);

/// One unpickled Python value. Values live in the Unpickler's arena and point to each other with raw
/// pointers, so reference cycles a hostile pickle may build cannot leak memory.
struct PickleValue {
  enum class Kind : uint8_t {
    None, Bool, Int, Float, Str, Bytes,
    List,     ///< list, set, frozenset
    Tuple,
    Dict,     ///< dict, OrderedDict, defaultdict (insertion order kept)
    Global,   ///< a reference to `module.name` (never resolved to code)
    Object,   ///< inert placeholder for an instance of a data class (e.g. argparse.Namespace)
    Storage,  ///< a torch storage, produced by the persistent-load hook
    Tensor,   ///< a strided view of a Storage (torch._utils._rebuild_tensor_v2)
  };
  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;  ///< Int value; Storage: number of elements
  double real = 0;
  std::string text;     ///< Str (UTF-8) / Bytes payload; Global/Object: "module.name"; Storage: record key
  std::vector<PickleValue*> items;                           ///< List/Tuple items; Object: constructor args
  std::vector<std::pair<PickleValue*, PickleValue*>> entries;  ///< Dict entries; Object: SETITEM(S) data
  std::unique_ptr<std::unordered_map<std::string, size_t>> index;  ///< Dict: hashable key -> entry position
  PickleValue* state = nullptr;                              ///< Object: BUILD state
  // Storage
  torch::ScalarType dtype = torch::kByte;
  int64_t storage_id = -1;  ///< index in the caller's storage table
  // Tensor
  PickleValue* storage = nullptr;
  int64_t offset = 0;  ///< in elements of the storage dtype (or of `view_dtype` / `view_widened`)
  std::vector<int64_t> sizes, strides;
  /// _rebuild_tensor_v3 (PyTorch 2.x): the element type named in the pickle, reinterpreting the
  /// storage's bytes; `view_widened` (safetensors name, e.g. "U16") when LibTorch 1.13 lacks it.
  bool has_view_dtype = false;
  torch::ScalarType view_dtype = torch::kByte;
  std::string view_widened;

  /// "dict", "tensor", "argparse.Namespace object", ... for error messages.
  std::string describe() const;
};

/// The element type of a torch storage class named in a persistent id ("torch.FloatStorage",
/// "torch.storage.UntypedStorage" -> uint8, ...). Returns false for anything else.
bool torch_storage_dtype(const std::string& qualified_name, torch::ScalarType* dtype);

/// The restricted unpickler. Supports pickle protocols 0-5 (the opcodes torch.save uses and the
/// other data opcodes). Policy, applied as the opcodes are read:
///  - GLOBAL/STACK_GLOBAL naming a module or builtin that can reach the OS or run code (os, posix,
///    nt, subprocess, sys, builtins.eval/exec/getattr/__import__/open, functools, operator, ...)
///    throws `mdd::Error` naming the global, before anything else happens.
///  - REDUCE/INST/OBJ (a call) is performed only for an allowlist: torch tensor/parameter/storage
///    rebuilds (emulated in C++), collections.OrderedDict/defaultdict, set/frozenset, torch.Size,
///    _codecs.encode, copyreg reconstructors and a few known data classes (argparse.Namespace,
///    pathlib paths, numpy scalars, datetime), which become inert placeholders. Any other call
///    throws `mdd::Error` naming the callable.
///  - NEWOBJ (cls.__new__) on an allowed class gives an inert placeholder; BUILD stores its state.
/// Every read is bounds-checked; stack, mark stack, memo and nesting are bounded.
class Unpickler {
 public:
  /// Maps a persistent id (the value after PERSID/BINPERSID) to a value (torch: a Storage).
  using PersistentLoad = std::function<PickleValue*(Unpickler&, PickleValue* pid)>;

  /// `source_bytes`: what the pickle occupied in the file (its compressed size when it came out of a
  /// DEFLATE entry; 0 = `size`). The object and work budgets scale with it, not with the inflated
  /// size, so a few KB of compressed pickle cannot claim gigabytes of objects.
  Unpickler(const uint8_t* data, size_t size, std::string what, PersistentLoad persistent_load,
            uint64_t source_bytes = 0);
  /// Runs the pickle up to STOP and returns the root value (owned by this Unpickler).
  PickleValue* load();
  /// A new value in the arena.
  PickleValue* make(PickleValue::Kind kind);
  /// Throws mdd::Error "<what>: pickle offset N: <message>".
  [[noreturn]] void fail(const std::string& message) const;
  /// Name used in messages.
  const std::string& what() const { return what_; }
  /// Accounts for `units` of work (items or bytes copied, hashed or compared) that an opcode causes
  /// beyond its own bytes. Memo references let a few pickle bytes reuse a huge object, so without
  /// this budget a small hostile pickle could make the loader copy gigabytes; the budget is linear
  /// in the pickle size.
  void charge(uint64_t units);

 private:
  uint8_t read_u8();
  const uint8_t* read_bytes(uint64_t n);
  std::string read_line();
  void push(PickleValue* v);
  PickleValue* pop();
  PickleValue* top();
  std::vector<PickleValue*> pop_mark();
  PickleValue* global(const std::string& module, const std::string& name);
  PickleValue* call(PickleValue* callable, const std::vector<PickleValue*>& args, Op opcode);
  PickleValue* new_object(PickleValue* cls, const std::vector<PickleValue*>& args);
  PickleValue* rebuild_tensor(const std::vector<PickleValue*>& args, const std::string& fn,
                             const PickleValue* view_dtype = nullptr);
  void set_item(PickleValue* target, PickleValue* key, PickleValue* value);
  void append(PickleValue* target, PickleValue* value);
  void memo_put(uint64_t index);
  PickleValue* memo_get(uint64_t index);
  PickleValue* make_int(int64_t v);
  PickleValue* make_long(const uint8_t* p, uint64_t n);
  PickleValue* make_text(PickleValue::Kind kind, const uint8_t* p, uint64_t n);

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0, op_pos_ = 0;
  std::string what_;
  PersistentLoad persistent_load_;
  std::deque<PickleValue> arena_;
  std::vector<PickleValue*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValue*> memo_;
  uint64_t work_ = 0, work_budget_ = 0;
  size_t max_values_ = 0;
  InputLimits limits_;
  int call_depth_ = 0;
};

}  // namespace detail
}  // namespace io
}  // namespace mdd
