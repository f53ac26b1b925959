// pybind11 bindings: validate buffers, extract pointers, release the GIL, call the core.
// No arithmetic here.  User arrays are never converted or copied: anything that would need a
// copy is rejected with an exception naming the array, before any element is touched.
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "fastoptim/fastoptim.hpp"
#include "fastoptim/registry.hpp"

namespace py = pybind11;
using namespace fastoptim;

namespace {

DType compute_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }

std::string dtype_name(const py::array& a) { return py::str(a.dtype()); }
// What a message calls a parameter by its label: "param w", or "param" alone for the empty
// label (the functional tier's one parameter).
std::string param_noun(const std::string& label) {
  return label.empty() ? "param" : "param " + label;
}

std::string shape_str(const py::array& a) {
  return py::str(py::tuple(py::cast(std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()))));
}

// A validated view of one array argument.
struct Arg {
  py::array arr;
  DType dtype;
  void* data;
  int64_t size;
  std::uintptr_t lo, hi;  // byte range [lo, hi); empty arrays have lo == hi
};

// The Python objects below are looked up once, by the first call that needs them, through
// pybind11's gil_safe_call_once_and_store: a plain function-local static would deadlock when
// threads make their first calls at once (the first one imports, the import lets another
// thread take the GIL, and that one then waits for the static while holding the GIL).

// ml_dtypes.bfloat16 (the NumPy bfloat16 of JAX and ml_dtypes), or None if not installed.
const py::object& bfloat16_dtype() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> dt;
  return dt
      .call_once_and_store_result([] {
        try {
          return py::object(
              py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16")));
        } catch (py::error_already_set&) {
          return py::object(py::none());
        }
      })
      .get_stored();
}

// numpy.ma.MaskedArray.
py::handle masked_array_type() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> type;
  return type
      .call_once_and_store_result(
          [] { return py::object(py::module_::import("numpy.ma").attr("MaskedArray")); })
      .get_stored();
}

// Check that `h` is an ndarray the kernels can update in place (or read, for gradients).
Arg check_array(py::handle h, const std::string& what, bool writeable) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(what + ": expected a numpy.ndarray, got " + type_name(h) +
                         (type_name(h) == "Tensor" ? " (pass tensor.numpy() for CPU tensors)" : ""));
  if (py::isinstance(h, masked_array_type()))
    throw py::type_error(what + ": a masked array; its mask would be ignored (every element is "
                         "read and updated): pass its data (np.ma.getdata) or fill it");
  auto a = py::reinterpret_borrow<py::array>(h);
  const py::dtype dt = a.dtype();
  const bool native = dt.byteorder() != '>' && dt.byteorder() != '<';  // '=' or '|'
  DType dtype;
  if (dt.equal(py::dtype::of<float>()))
    dtype = DType::f32;
  else if (dt.equal(py::dtype::of<double>()))
    dtype = DType::f64;
  else if (dt.kind() == 'f' && dt.itemsize() == 2 && native)
    dtype = DType::f16;
  else if (!bfloat16_dtype().is_none() && dt.equal(bfloat16_dtype()))
    dtype = DType::bf16;
  else if (dt.kind() == 'f' && !native)
    throw py::type_error(what + ": dtype " + dtype_name(a) +
                         " has non-native byte order; it would need a copy");
  else if (dt.kind() == 'c' && (dt.itemsize() == 8 || dt.itemsize() == 16))
    throw py::type_error(what + ": dtype must be float32, float64, float16 or bfloat16 "
                         "(ml_dtypes.bfloat16), got " + dtype_name(a) +
                         ": pass a complex array's real view, z.view(np." +
                         (dt.itemsize() == 8 ? "float32" : "float64") +
                         ") (zero-copy; its real and imaginary parts are elements, as "
                         "torch.optim updates complex parameters)");
  else
    throw py::type_error(what + ": dtype must be float32, float64, float16 or bfloat16 "
                         "(ml_dtypes.bfloat16), got " + dtype_name(a));
  const int flags = a.flags();
  if (!(flags & py::array::c_style))
    throw py::value_error(
        what + ": array is not C-contiguous (shape " + shape_str(a) + ", strides " +
        py::str(py::tuple(py::cast(std::vector<py::ssize_t>(a.strides(), a.strides() + a.ndim()))))
            .cast<std::string>() +
        (writeable ? "); updating it in place would need a copy"
                   : "); gradients are read in place: pass np.ascontiguousarray(grad)"));
  if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(what + ": array data is not aligned to its itemsize");
  if (writeable && !a.writeable()) throw py::value_error(what + ": array is read-only");
  const auto lo = reinterpret_cast<std::uintptr_t>(a.data());
  const auto size = static_cast<int64_t>(a.size());
  const auto hi = lo + static_cast<std::uintptr_t>(size * a.itemsize());
  return {a, dtype, const_cast<void*>(a.data()), size, lo, hi};
}

// The arrays of an element-wise helper (combine, lerp): out (written) and two inputs, all float32
// or all float64 and of one size; out may be an input (element i reads only element i) but must
// not overlap one otherwise.  names: out's, then the inputs', as the Python keywords.
std::array<Arg, 3> check_elementwise(const std::string& fn, const std::array<const char*, 3>& names,
                                     py::handle out, py::handle x, py::handle y) {
  const Arg o = check_array(out, names[0], true), a = check_array(x, names[1], false),
            b = check_array(y, names[2], false);
  const std::string all = fn + ": " + names[0] + ", " + names[1] + " and " + names[2];
  if (o.dtype != a.dtype || o.dtype != b.dtype || (o.dtype != DType::f32 && o.dtype != DType::f64))
    throw py::type_error(all + " must all be float32 or all float64");
  if (a.size != o.size || b.size != o.size) throw py::value_error(all + " must have the same size");
  for (const Arg* in : {&a, &b})
    if (in->data != o.data && in->lo < o.hi && o.lo < in->hi)
      throw py::value_error(fn + ": out overlaps an input without being it");
  return {o, a, b};
}

void check_shape(const Arg& x, const py::array& param, const std::string& what) {
  const bool same_shape =
      x.arr.ndim() == param.ndim() &&
      std::equal(x.arr.shape(), x.arr.shape() + x.arr.ndim(), param.shape());
  if (!same_shape)
    throw py::value_error(what + ": shape " + shape_str(x.arr) +
                          " does not match the parameter's " + shape_str(param));
}

// A gradient or state array of a parameter whose kernel computes in `compute`: float64 arrays
// for float64 parameters; float32, bfloat16 or float16 for the others (converted by the driver).
void check_operand(const Arg& x, const py::array& param, DType compute, const std::string& what) {
  const bool ok = compute == DType::f64 ? x.dtype == DType::f64 : x.dtype != DType::f64;
  if (!ok)
    throw py::type_error(what + ": dtype " + dtype_name(x.arr) + " does not go with the " +
                         dtype_name(param) + " parameter (" +
                         (compute == DType::f64 ? "float64 only"
                                                : "float32, bfloat16 or float16") + ")");
  check_shape(x, param, what);
}

// The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), unversioned form: what
// torch._C._to_dlpack returns in a capsule named "dltensor".  fastoptim.torch hands gradients
// over this way: one C call per tensor that exposes its pointer, dtype, device, shape and strides
// (a NumPy view costs four times as much).  The capsule keeps the tensor alive while it is bound.
struct DLDevice {
  int32_t device_type;  // kDLCPU = 1
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLFloat = 2, kDLBfloat = 4
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL: compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

// Where a gradient's elements are (and their dtype), from an ndarray or a DLPack capsule.
struct Memory {
  DType dtype;
  void* data;
  int64_t size;
  std::uintptr_t lo, hi;
};

// A gradient given as a DLPack capsule: a CPU float tensor laid out exactly like the C-contiguous
// `param` (same shape, row-major strides; a dimension of size 1 may have any stride).  The
// capsule is only read (never consumed): its owner frees the tensor when it is released.
Memory check_dlpack(py::handle h, const py::array& param, const std::string& what) {
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(h.ptr(), "dltensor"));
  if (m == nullptr) {
    PyErr_Clear();
    throw py::type_error(what + ": a capsule that is not an unconsumed DLPack tensor");
  }
  const DLTensor& t = m->dl_tensor;
  if (t.device.device_type != 1) throw py::type_error(what + ": not a CPU tensor");
  DType dtype;
  if (t.dtype.lanes != 1) throw py::type_error(what + ": vector dtype");
  if (t.dtype.code == 2 && t.dtype.bits == 32)
    dtype = DType::f32;
  else if (t.dtype.code == 2 && t.dtype.bits == 64)
    dtype = DType::f64;
  else if (t.dtype.code == 2 && t.dtype.bits == 16)
    dtype = DType::f16;
  else if (t.dtype.code == 4 && t.dtype.bits == 16)
    dtype = DType::bf16;
  else
    throw py::type_error(what + ": dtype must be float32, float64, float16 or bfloat16");
  const auto ndim = static_cast<py::ssize_t>(t.ndim);
  bool same = ndim == param.ndim();
  int64_t size = 1, stride = 1;
  for (py::ssize_t d = ndim - 1; same && d >= 0; --d) {
    same = t.shape[d] == param.shape(d) &&
           (t.strides == nullptr || t.shape[d] == 1 || t.strides[d] == stride);
    stride *= t.shape[d];
    size *= t.shape[d];
  }
  if (!same)
    throw py::value_error(what + ": not laid out like the parameter " + shape_str(param) +
                          " (contiguous, same shape)");
  const int64_t itemsize = dtype_size(dtype);
  auto* data = static_cast<char*>(t.data) + t.byte_offset;
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  if (size && lo % static_cast<std::uintptr_t>(itemsize))
    throw py::value_error(what + ": data is not aligned to its itemsize");
  return {dtype, data, size, lo, lo + static_cast<std::uintptr_t>(size * itemsize)};
}

// DLPack's C exchange API (DLPack >= 1.2; torch >= 2.10 exposes it as the capsule
// torch.Tensor.__dlpack_c_exchange_api__): a table of C functions, of which fastoptim uses the
// one that describes a tensor (pointer, dtype, device, shape, strides) in a caller's DLTensor
// without allocating: about 20 ns, where a Python method call on a tensor costs 100.
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLPackExchangeAPIHeader {
  DLPackVersion version;
  DLPackExchangeAPIHeader* prev_api;
};
struct DLPackExchangeAPI {
  DLPackExchangeAPIHeader header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, DLTensor* out);  // may be NULL
  void* current_work_stream;
};

// What Plan.bind_torch needs from torch, set once by fastoptim.torch (set_torch_api).
struct TorchApi {
  int (*describe)(void*, DLTensor*) = nullptr;
  PyTypeObject* tensor = nullptr;  // torch.Tensor: the gradients' exact type
  PyTypeObject* parameter = nullptr;  // torch.nn.Parameter
  py::object keep;  // the capsule and the types
  py::object grad = py::str("grad");
  // torch.Tensor._is_view, .is_neg, .is_conj (method descriptors)
  py::object is_view, is_neg, is_conj;
  // The C functions behind them, called directly (no attribute lookup, no vectorcall): the
  // getter of the data descriptor `grad` of torch's C tensor type (what `p.grad` finds first
  // for a torch.Tensor or a Parameter while neither type was modified: see grad_of), and the
  // no-argument methods.
  PyObject* grad_descr = nullptr;  // (kept alive by `keep`)
  getter get_grad = nullptr;
  void* grad_closure = nullptr;
  unsigned int tags[2] = {0, 0};  // tp_version_tag of tensor, parameter when that was checked
  PyCFunction is_view_fn = nullptr, is_neg_fn = nullptr, is_conj_fn = nullptr;
};
TorchApi& torch_api() {
  static TorchApi* api = new TorchApi();  // never destroyed (its objects outlive the module)
  return *api;
}

// The C function of a no-argument method descriptor (torch.Tensor._is_view), or nullptr.
PyCFunction noargs_function(const py::object& method) {
  if (!PyObject_TypeCheck(method.ptr(), &PyMethodDescr_Type)) return nullptr;
  PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(method.ptr())->d_method;
  return (def->ml_flags & METH_NOARGS) && !(def->ml_flags & METH_CLASS) ? def->ml_meth : nullptr;
}

// `p.grad` for `p` of type torch.Tensor or torch.nn.Parameter (exactly; `which` 0 or 1): the
// getter called directly where the attribute lookup would find it, that is while the type's
// version tag is the one recorded when its `grad` was last seen to be that descriptor (any
// assignment to the type or its bases changes the tag: it is looked up again); else the lookup.
PyObject* grad_of(TorchApi& api, PyObject* p, int which) {
  PyTypeObject* type = Py_TYPE(p);
  if (api.get_grad != nullptr) {
    const unsigned int tag = type->tp_version_tag;
    if (tag != 0 && tag == api.tags[which]) return api.get_grad(p, api.grad_closure);
    PyObject* d = PyObject_GetAttr(reinterpret_cast<PyObject*>(type), api.grad.ptr());
    if (d == nullptr) {
      PyErr_Clear();
    } else {
      const bool same = d == api.grad_descr;
      Py_DECREF(d);
      if (same) {  // (the lookup gave the type a tag, if it had none)
        api.tags[which] = type->tp_version_tag;
        return api.get_grad(p, api.grad_closure);
      }
    }
  }
  return PyObject_GetAttr(p, api.grad.ptr());
}

// A DLTensor's element dtype, if the kernels take it.
std::optional<DType> dl_dtype(const DLDataType& d) {
  if (d.lanes != 1 || d.bits == 0) return std::nullopt;
  if (d.code == 2 && d.bits == 32) return DType::f32;
  if (d.code == 2 && d.bits == 64) return DType::f64;
  if (d.code == 2 && d.bits == 16) return DType::f16;
  if (d.code == 4 && d.bits == 16) return DType::bf16;
  return std::nullopt;
}

// The dtype of the real view of a complex gradient of dtype `g` (the kernels update the real
// views of a complex parameter and its gradient: fastoptim.torch's _local) for a parameter of
// dtype `p`: float32 for complex64, float64 for complex128; nothing unless both are that one.
std::optional<DType> complex_part(const DLDataType& g, const DLDataType& p) {
  constexpr uint8_t kComplex = 5;  // (DLPack's kDLComplex)
  if (g.code != kComplex || g.code != p.code || g.bits != p.bits || g.lanes != 1 || p.lanes != 1)
    return std::nullopt;
  if (g.bits == 64) return DType::f32;
  if (g.bits == 128) return DType::f64;
  return std::nullopt;
}

// A DLPack dtype as one integer (bind_torch's record of a parameter's dtype).
int64_t dtype_key(const DLDataType& d) {
  return (int64_t{d.code} << 32) | (int64_t{d.bits} << 16) | int64_t{d.lanes};
}

// The codes of a block-quantized state: a uint8 ndarray, C-contiguous, writeable.
Arg check_codes(py::handle h, const std::string& what) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(what + ": expected a numpy.ndarray of uint8 codes, got " + type_name(h));
  auto a = py::reinterpret_borrow<py::array>(h);
  if (!a.dtype().equal(py::dtype::of<uint8_t>()))
    throw py::type_error(what + ": codes must be uint8, got " + dtype_name(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(what + ": codes array is not C-contiguous");
  if (!a.writeable()) throw py::value_error(what + ": codes array is read-only");
  const auto lo = reinterpret_cast<std::uintptr_t>(a.data());
  const auto size = static_cast<int64_t>(a.size());
  return {a, DType::q8s, const_cast<void*>(a.data()), size, lo, lo + static_cast<std::uintptr_t>(size)};
}

// The quantization map named `name` ("signed8", "unsigned8", "signed4", "unsigned4").
QMap qmap_from_name(const std::string& name) {
  if (name == "signed8") return QMap::signed8;
  if (name == "unsigned8") return QMap::unsigned8;
  if (name == "signed4") return QMap::signed4;
  if (name == "unsigned4") return QMap::unsigned4;
  throw py::value_error("unknown quantization map '" + name +
                        "' (known: signed8, unsigned8, signed4, unsigned4)");
}

// A block-quantized state given as (codes, absmax) for a parameter of `size` elements, of the
// kind the caller names (`bits`, from the state's map: never read from the codes' shape): 8-bit
// codes shaped like the parameter with one float32 absmax per block of kQBlock elements, or
// 4-bit codes packed two per byte (a 1-D array of (size + 1) / 2 bytes) with one absmax per
// block of kQBlock4.
std::pair<Arg, Arg> check_quantized(py::handle h, const py::array& param, DType compute,
                                    const std::string& what, int bits) {
  const auto t = py::reinterpret_borrow<py::tuple>(h);
  if (t.size() != 2)
    throw py::value_error(what + ": a quantized state is a pair (codes, absmax), got " +
                          std::to_string(t.size()) + " items");
  if (compute == DType::f64)
    throw py::type_error(what + ": float64 parameters keep float64 state (no quantized state)");
  Arg codes = check_codes(t[0], what);
  const auto psize = static_cast<int64_t>(param.size());
  const int64_t packed = (psize + 1) / 2;
  if (bits == 4) {
    if (codes.arr.ndim() != 1 || codes.size != packed)
      throw py::value_error(what + ": 4-bit codes must be a 1-D uint8 array of " +
                            std::to_string(packed) + " bytes (two codes per byte for " +
                            std::to_string(psize) + " elements), got shape " +
                            shape_str(codes.arr));
  } else {
    check_shape(codes, param, what + ": 8-bit codes");
  }
  const int64_t block = bits == 4 ? kQBlock4 : kQBlock;
  Arg absmax = check_array(t[1], what + " absmax", true);
  const int64_t blocks = (psize + block - 1) / block;
  if (absmax.dtype != DType::f32 || absmax.arr.ndim() != 1 || absmax.size != blocks)
    throw py::value_error(what + ": absmax must be a 1-D float32 array of " + std::to_string(blocks) +
                          " entries (one per block of " + std::to_string(block) +
                          " elements), got " + dtype_name(absmax.arr) + " " + shape_str(absmax.arr));
  return {codes, absmax};
}

struct Span {
  std::uintptr_t lo, hi;
  std::string what;
};
struct Range {  // a Span without its name
  std::uintptr_t lo, hi;
};

// Sort spans by address; throw if any two of them overlap (memory shared between arrays).
void sort_and_check_disjoint(std::vector<Span>& spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (std::size_t i = 1; i < spans.size(); ++i)
    if (spans[i].lo < spans[i - 1].hi)
      throw py::value_error(spans[i].what + " shares memory with " + spans[i - 1].what +
                            "; every array must be distinct");
}

// A plan is used by one step at a time: every step and bind_grads holds its mutex, so a step on
// another thread (running without the GIL) never reads gradients that bind_grads is replacing.
// Steps of different plans run in parallel.  The mutex is never waited for while holding the
// GIL (that would deadlock with a thread that holds the plan and needs the GIL back).
class PyPlan {
 public:
  // Lock the plan; call with the GIL held (released while waiting, held again on return).
  class Lock {
   public:
    explicit Lock(PyPlan& p) : mu_(p.mutex()) {
      if (!mu_.try_lock()) {
        py::gil_scoped_release release;
        mu_.lock();
      }
    }
    ~Lock() { mu_.unlock(); }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;

   private:
    std::mutex& mu_;
  };

  // `masters`, `comps`, `outs`: None, or one entry per parameter (an array or None): the
  // float32 master copy of a bfloat16/float16 parameter, the Kahan compensation of one (its
  // dtype), the bfloat16/float16 copy-out array of a float32 parameter.  `ids`: the tensors'
  // numbers for stochastic rounding (default 0, 1, ...).  `emas`: None or one entry per
  // parameter, the exponential moving average of it (float64 for a float64 parameter; float32,
  // bfloat16 or float16 for the others).
  PyPlan(const py::sequence& params, const std::vector<std::string>& labels,
         const std::vector<std::string>& state_names, const py::sequence& states,
         const py::object& masters, const py::object& comps, const py::object& outs,
         const std::optional<std::vector<uint64_t>>& ids, const py::object& emas,
         const std::optional<std::vector<std::string>>& qmaps) {
    const auto n = static_cast<std::size_t>(py::len(params));
    const auto k = state_names.size();
    if (labels.size() != n) throw py::value_error("labels: need one label per parameter");
    if (k > static_cast<std::size_t>(kMaxState)) throw py::value_error("too many state buffers");
    if (static_cast<std::size_t>(py::len(states)) != k)
      throw py::value_error("states: need one list of arrays per state name");
    if (ids && ids->size() != n) throw py::value_error("ids: need one id per parameter");
    if (qmaps && qmaps->size() != k) throw py::value_error("qmaps: need one entry per state name");
    nouns_.resize(n);  // (what the messages call each parameter)
    for (std::size_t i = 0; i < n; ++i) nouns_[i] = param_noun(labels[i]);
    const std::vector<std::string>& nouns = nouns_;
    std::vector<Arg> ps;
    ps.reserve(n);
    for (std::size_t i = 0; i < n; ++i) ps.push_back(check_array(params[i], nouns[i], true));
    // The optional per-parameter arrays, checked for their role.
    auto extra = [&](const py::object& seq, const char* role) {
      std::vector<std::optional<Arg>> out(n);
      if (seq.is_none()) return out;
      if (static_cast<std::size_t>(py::len(seq)) != n)
        throw py::value_error(std::string(role) + "s: need one entry (an array or None) per parameter");
      for (std::size_t i = 0; i < n; ++i) {
        const py::handle h = py::sequence(seq)[i];
        if (!h.is_none()) out[i] = check_array(h, std::string(role) + " of " + nouns[i], true);
      }
      return out;
    };
    const auto ms = extra(masters, "master copy");
    const auto cs = extra(comps, "compensation");
    const auto os = extra(outs, "copy-out");
    const auto es = extra(emas, "EMA");
    const auto low = [](DType d) { return d == DType::bf16 || d == DType::f16; };
    for (std::size_t i = 0; i < n; ++i) {
      const std::string who = " of " + nouns[i];
      const py::array& p = ps[i].arr;
      if (ms[i]) {
        if (!low(ps[i].dtype))
          throw py::type_error("master copy" + who + ": only bfloat16 and float16 parameters "
                               "have one (the parameter is " + dtype_name(p) + ")");
        if (ms[i]->dtype != DType::f32)
          throw py::type_error("master copy" + who + ": dtype must be float32, got " + dtype_name(ms[i]->arr));
        check_shape(*ms[i], p, "master copy" + who);
      }
      if (cs[i]) {
        if (!low(ps[i].dtype) || ms[i])
          throw py::type_error("compensation" + who + ": only bfloat16 and float16 parameters "
                               "without a master copy have one");
        if (cs[i]->dtype != ps[i].dtype)
          throw py::type_error("compensation" + who + ": dtype " + dtype_name(cs[i]->arr) +
                               " must be the parameter's " + dtype_name(p));
        check_shape(*cs[i], p, "compensation" + who);
      }
      if (os[i]) {
        if (ps[i].dtype != DType::f32)
          throw py::type_error("copy-out" + who + ": only float32 parameters have one (the "
                               "parameter is " + dtype_name(p) + ")");
        if (!low(os[i]->dtype))
          throw py::type_error("copy-out" + who + ": dtype must be bfloat16 or float16, got " +
                               dtype_name(os[i]->arr));
        check_shape(*os[i], p, "copy-out" + who);
      }
      if (es[i]) check_operand(*es[i], p, compute_dtype(ps[i].dtype), "EMA" + who);
    }
    std::vector<std::vector<Arg>> ss(k);
    std::vector<std::vector<std::optional<Arg>>> qs(k);  // absmax of quantized states
    for (std::size_t j = 0; j < k; ++j) {
      const py::sequence sj = states[j];
      if (static_cast<std::size_t>(py::len(sj)) != n)
        throw py::value_error("states: need one '" + state_names[j] + "' array per parameter");
      for (std::size_t i = 0; i < n; ++i) {
        const std::string what = "state '" + state_names[j] + "' of " + nouns[i];
        const py::handle h = sj[i];
        if (py::isinstance<py::tuple>(h)) {
          const std::string map = qmaps ? (*qmaps)[j] : std::string();
          if (map.empty())
            throw py::type_error(what + ": this state cannot be quantized (no map for it)");
          const QMap qm = qmap_from_name(map);  // (its kind: the caller's state_dtype)
          auto [codes, absmax] = check_quantized(h, ps[i].arr, compute_dtype(ps[i].dtype), what,
                                                 is_map4(qm) ? 4 : 8);
          const bool sgn = qm == QMap::signed8 || qm == QMap::signed4;
          codes.dtype = is_map4(qm) ? (sgn ? DType::q4s : DType::q4u) : (sgn ? DType::q8s : DType::q8u);
          ss[j].push_back(codes);
          qs[j].push_back(absmax);
        } else {
          ss[j].push_back(check_array(h, what, true));
          check_operand(ss[j][i], ps[i].arr, compute_dtype(ps[i].dtype), what);
          qs[j].push_back(std::nullopt);
        }
      }
    }
    auto span = [&](const Arg& a, const std::string& what) {
      if (a.size) spans_.push_back({a.lo, a.hi, what});
    };
    for (std::size_t i = 0; i < n; ++i) {
      span(ps[i], nouns[i]);
      for (std::size_t j = 0; j < k; ++j) {
        span(ss[j][i], "state '" + state_names[j] + "' of " + nouns[i]);
        if (qs[j][i]) span(*qs[j][i], "absmax of state '" + state_names[j] + "' of " + nouns[i]);
      }
      if (ms[i]) span(*ms[i], "master copy of " + nouns[i]);
      if (cs[i]) span(*cs[i], "compensation of " + nouns[i]);
      if (os[i]) span(*os[i], "copy-out of " + nouns[i]);
      if (es[i]) span(*es[i], "EMA of " + nouns[i]);
    }
    sort_and_check_disjoint(spans_);
    plan_.nstate = static_cast<int>(k);
    for (std::size_t i = 0; i < n; ++i) {
      Tensor t;
      t.size = ps[i].size;
      t.dtype = ps[i].dtype;
      t.param = ps[i].data;
      t.ndim = static_cast<int>(ps[i].arr.ndim());
      if (ms[i]) {  // the kernel updates the master copy; the parameter is its rounded copy
        t.dtype = DType::f32;
        t.param = ms[i]->data;
        t.out = ps[i].data;
        t.out_dtype = ps[i].dtype;
      }
      if (os[i]) {
        t.out = os[i]->data;
        t.out_dtype = os[i]->dtype;
      }
      if (cs[i]) t.comp = cs[i]->data;
      if (es[i]) {
        t.ema = es[i]->data;
        t.ema_dtype = es[i]->dtype;
      }
      t.grad_dtype = compute_dtype(ps[i].dtype);
      for (std::size_t j = 0; j < k; ++j) {
        t.state[j] = ss[j][i].data;
        t.state_dtype[j] = ss[j][i].dtype;
        if (qs[j][i]) t.absmax[j] = static_cast<float*>(qs[j][i]->data);
      }
      t.id = ids ? (*ids)[i] : static_cast<uint64_t>(i);
      t.classify(static_cast<int>(k));
      plan_.add(t);
      params_.push_back(ps[i].arr);
      param_data_.push_back(ps[i].data);
    }
    // (`layout`: also its dtype, shape and strides: the user's arrays, parameters and copy-outs)
    const auto watch = [&](const Arg& a, const std::string& what, bool layout = false) {
      watched_.push_back({a.arr, a.data, a.arr.size(), a.arr.dtype(),
                          std::vector<py::ssize_t>(a.arr.shape(), a.arr.shape() + a.arr.ndim()),
                          std::vector<py::ssize_t>(a.arr.strides(), a.arr.strides() + a.arr.ndim()),
                          what, layout});
    };
    for (std::size_t i = 0; i < n; ++i) {
      watch(ps[i], nouns[i], true);
      for (std::size_t j = 0; j < k; ++j) {
        const std::string sw = "state '" + state_names[j] + "' of " + nouns[i];
        watch(ss[j][i], sw);
        if (qs[j][i]) watch(*qs[j][i], "absmax of " + sw);
      }
      if (ms[i]) watch(*ms[i], "master copy of " + nouns[i]);
      if (cs[i]) watch(*cs[i], "compensation of " + nouns[i]);
      if (os[i]) watch(*os[i], "copy-out of " + nouns[i], true);
      if (es[i]) watch(*es[i], "EMA of " + nouns[i]);
    }
    state_names_ = state_names;
  }

  // Stochastic rounding (and its seed) or round-to-nearest for every bfloat16/float16 store.
  void set_rounding(const std::string& mode, uint64_t seed) {
    Rounding r;
    if (mode == "nearest")
      r = Rounding::nearest;
    else if (mode == "stochastic")
      r = Rounding::stochastic;
    else
      throw py::value_error("rounding must be 'nearest' or 'stochastic', got '" + mode + "'");
    Lock lock(*this);
    plan_.rounding = r;
    plan_.seed = seed;
  }
  std::string rounding() const {
    return plan_.rounding == Rounding::nearest ? "nearest" : "stochastic";
  }
  uint64_t seed() const { return plan_.seed; }

  // The gradient transform of the steps that follow: the kernels see clamp(g * mul, -clip,
  // clip).  Identity: mul = 1, clip = inf.
  void set_grad_transform(double mul, double clip) {
    // (A NaN mul is taken: the clipping factor of a NaN norm, which makes the step NaN, as
    // torch's clip_grad_norm_ does.)
    if (!(clip >= 0)) throw py::value_error("clip must be >= 0 (inf: no clipping)");
    if (std::isinf(mul)) throw py::value_error("mul must not be infinite");
    const bool f32_range =  // (float32 kernels multiply by float(mul))
        std::isnan(mul) || (std::fabs(mul) <= std::numeric_limits<float>::max() &&
                            (mul == 0 || static_cast<float>(mul) != 0));
    if (!f32_range)
      for (const Tensor& t : plan_.tensors)
        if (t.compute() != DType::f64)
          throw py::value_error("mul " + py::str(py::float_(mul)).cast<std::string>() +
                                " is out of float32's range, this plan's arithmetic (it would "
                                "make every gradient infinite or 0)");
    Lock lock(*this);
    plan_.grad_mul = mul;
    plan_.grad_clip = clip;
  }
  double grad_mul() const { return plan_.grad_mul; }
  double grad_clip() const { return plan_.grad_clip; }
  void set_ema_decay(double decay) {
    if (!(decay >= 0 && decay <= 1)) throw py::value_error("ema_decay must be in [0, 1]");
    Lock lock(*this);
    plan_.ema_decay = decay;
  }
  double ema_decay() const { return plan_.ema_decay; }
  // grad_stats of the bound gradients (GIL released while reading them).
  py::tuple stats() {
    Lock lock(*this);
    const Plan& p = plan();
    GradStats r;
    {
      py::gil_scoped_release release;
      r = grad_stats(p);
    }
    return py::make_tuple(r.sumsq, r.finite);
  }

  // Validate every gradient, then (only if all are fine) point the plan at them.
  void bind_grads(const py::sequence& grads) {
    Lock lock(*this);
    bind_grads_locked(grads);
  }
  void bind_grads_locked(const py::sequence& grads) {
    const std::size_t n = plan_.tensors.size();
    if (static_cast<std::size_t>(py::len(grads)) != n)
      throw py::value_error("grads: expected " + std::to_string(n) + " gradients, got " +
                            std::to_string(py::len(grads)));
    std::vector<Memory> gs;
    gs.reserve(n);
    std::vector<Span> spans;
    for (std::size_t i = 0; i < n; ++i) {
      const std::string what = "grad for " + nouns_[i];
      const py::handle h = grads[i];
      if (PyCapsule_CheckExact(h.ptr())) {  // a DLPack tensor (fastoptim.torch)
        gs.push_back(check_dlpack(h, params_[i], what));
        const bool ok = plan_.tensors[i].compute() == DType::f64 ? gs[i].dtype == DType::f64
                                                                 : gs[i].dtype != DType::f64;
        if (!ok) throw py::type_error(what + ": its dtype does not go with the parameter's");
      } else {
        const Arg a = check_array(h, what, false);
        check_operand(a, params_[i], plan_.tensors[i].compute(), what);
        gs.push_back({a.dtype, a.data, a.size, a.lo, a.hi});
      }
      if (gs[i].size) spans.push_back({gs[i].lo, gs[i].hi, what});
    }
    sort_and_check_disjoint(spans);
    for (const Span& g : spans) {  // against params and states (disjoint, sorted by address)
      auto it = std::upper_bound(spans_.begin(), spans_.end(), g.hi - 1,
                                 [](std::uintptr_t x, const Span& s) { return x < s.lo; });
      if (it != spans_.begin() && std::prev(it)->hi > g.lo)
        throw py::value_error(g.what + " shares memory with " + std::prev(it)->what +
                              "; every array must be distinct");
    }
    grads_.clear();
    for (std::size_t i = 0; i < n; ++i) {
      plan_.tensors[i].grad = gs[i].data;
      plan_.set_grad_dtype(i, gs[i].dtype);
      grads_.push_back(py::reinterpret_borrow<py::object>(grads[i]));
    }
    bound_ = true;
  }

  // fastoptim.torch: the state tensors behind the plan's arrays (their data now: a tensor whose
  // storage is replaced later, by share_memory_(), `.data =` or set_(), leaves the plan's
  // array on the old memory, freed by share_memory_()) and the packed scalar buffers (one
  // value per buffer on the fast path: an entry edited in place splits it).  bind_torch
  // declines when either changed; the general path rebuilds the arrays or splits the step.
  // (Without the API there is no fast path to guard: nothing is watched.  A tensor that
  // describe refuses cannot be checked: it makes bind_torch decline at every step.)
  void watch_torch(const py::list& states, const py::list& scalars) {
    TorchApi& api = torch_api();
    if (api.describe == nullptr) return;
    std::vector<WatchedState> watched;
    DLTensor d{};
    for (py::handle t : states) {
      WatchedState w{py::reinterpret_borrow<py::object>(t), nullptr, {}};
      // (data stays null, never a tensor's address, where describe fails: bind_torch declines)
      if (api.describe(t.ptr(), &d) != 0)
        PyErr_Clear();
      else {
        w.data = static_cast<const char*>(d.data) + d.byte_offset;
        append_layout(w.layout, d);
      }
      watched.push_back(std::move(w));
    }
    std::vector<py::array> buffers;
    for (py::handle a : scalars) {
      if (!py::isinstance<py::array>(a))
        throw py::type_error("watch_torch: scalars must be numpy arrays, got " + type_name(a));
      buffers.push_back(py::reinterpret_borrow<py::array>(a));
    }
    Lock lock(*this);
    torch_states_ = std::move(watched);
    torch_scalars_ = std::move(buffers);
  }

  // fastoptim.torch's fast path: `params` is a parameter group's list of tensors; those whose
  // `grad` is not None must be this plan's parameters, in order.  Reads every gradient and
  // checks, through DLPack's exchange API, that every parameter of the plan is where it was and
  // laid out as when this was first called, and that each gradient is a CPU tensor (no negative
  // bit) with its parameter's shape and strides and a dtype the kernel takes, disjoint from the
  // plan's arrays; then binds them.  False, binding nothing, where anything differs (a tensor
  // of watch_torch's moved, a scalar buffer holds two values) or the API is not there: the
  // caller takes the general path (NumPy views, every check with its message).
  bool bind_torch(const py::list& params) {
    TorchApi& api = torch_api();
    if (api.describe == nullptr) return false;
    Lock lock(*this);
    const std::size_t n = plan_.tensors.size();
    const auto m = static_cast<std::size_t>(PyList_GET_SIZE(params.ptr()));
    const bool first = torch_mask_.empty();
    if (!first && torch_mask_.size() != m) return false;
    std::vector<char> mask(m, 0);
    std::vector<py::object> grads;
    grads.reserve(n);
    std::vector<Range>& ranges = scratch_ranges_;
    ranges.clear();
    std::vector<std::pair<const void*, DType>>& bound = scratch_bound_;
    bound.clear();
    std::vector<int64_t> layout;  // per parameter of the plan (append_layout)
    DLTensor pt{}, gt{};
    std::size_t j = 0;
    for (std::size_t i = 0; i < m; ++i) {
      PyObject* p = PyList_GET_ITEM(params.ptr(), i);
      const int which = Py_TYPE(p) == api.tensor ? 0 : Py_TYPE(p) == api.parameter ? 1 : -1;
      if (which < 0 || (!first && p != torch_params_[i].ptr())) return false;
      PyObject* g = grad_of(api, p, which);
      if (g == nullptr) {
        PyErr_Clear();
        return false;
      }
      py::object grad = py::reinterpret_steal<py::object>(g);
      if (g == Py_None) continue;
      if (j == n || (!first && !torch_mask_[i])) return false;
      mask[i] = 1;
      // the parameter: where the plan writes, laid out as recorded
      if (api.describe(p, &pt) != 0) {
        PyErr_Clear();
        return false;
      }
      const char* pdata = static_cast<const char*>(pt.data) + pt.byte_offset;
      if (pdata != param_data_[j] || pt.device.device_type != 1) return false;
      const std::size_t at = torch_offsets_.empty() ? 0 : torch_offsets_[j];
      // (a complex parameter: the plan's array is its real view, two elements each)
      const bool complex = complex_part(pt.dtype, pt.dtype).has_value();
      if (first) {
        int64_t numel = complex ? 2 : 1;
        for (int d = 0; d < pt.ndim; ++d) numel *= pt.shape[d];
        if (pt.strides == nullptr || numel != plan_.tensors[j].size ||
            !dense(pt.ndim, pt.shape, pt.strides))
          return false;
        append_layout(layout, pt);
      } else if (!same_layout(pt, torch_layout_.data() + at)) {  // (another dtype included)
        return false;
      }
      // the gradient: a plain CPU tensor laid out like its parameter
      if (Py_TYPE(g) != api.tensor || api.describe(g, &gt) != 0) {
        PyErr_Clear();
        return false;
      }
      const auto dtype = complex ? complex_part(gt.dtype, pt.dtype) : dl_dtype(gt.dtype);
      if (!dtype || gt.device.device_type != 1 || gt.ndim != pt.ndim || gt.strides == nullptr)
        return false;
      if ((plan_.tensors[j].compute() == DType::f64) != (*dtype == DType::f64)) return false;
      for (int d = 0; d < pt.ndim; ++d)
        if (gt.shape[d] != pt.shape[d] || (pt.shape[d] > 1 && gt.strides[d] != pt.strides[d]))
          return false;
      // A negative view's memory holds -g, a conjugate one's conj(g); such tensors are views
      // (rare for gradients).
      if (is_true(api.is_view_fn, api.is_view.ptr(), g) != 0 &&
          (is_true(api.is_neg_fn, api.is_neg.ptr(), g) != 0 ||
           (complex && is_true(api.is_conj_fn, api.is_conj.ptr(), g) != 0)))
        return false;
      const auto* gdata = static_cast<const char*>(gt.data) + gt.byte_offset;
      const int64_t bytes = plan_.tensors[j].size * dtype_size(*dtype);
      const auto lo = reinterpret_cast<std::uintptr_t>(gdata);
      if (lo % static_cast<std::uintptr_t>(dtype_size(*dtype))) return false;
      if (bytes) ranges.push_back({lo, lo + static_cast<std::uintptr_t>(bytes)});
      bound.emplace_back(gdata, *dtype);
      grads.push_back(std::move(grad));
      ++j;
    }
    if (j != n) return false;
    if (!disjoint_from_plan(ranges)) return false;
    // the state tensors behind the plan's arrays still on the memory they were built on, and
    // each packed scalar buffer one value (a fast step advances it as one)
    for (const WatchedState& w : torch_states_) {
      if (api.describe(w.tensor.ptr(), &pt) != 0) {
        PyErr_Clear();
        return false;
      }
      // on that memory, and not re-viewed in place since (as_strided_, a dtype view's set_)
      if (static_cast<const char*>(pt.data) + pt.byte_offset != w.data) return false;
      if (!same_layout(pt, w.layout.data())) return false;
    }
    for (const py::array& a : torch_scalars_) {
      const auto* b = static_cast<const char*>(a.data());
      const auto size = static_cast<std::size_t>(a.itemsize());
      for (py::ssize_t k = 1; k < a.size(); ++k)
        if (std::memcmp(b, b + static_cast<std::size_t>(k) * size, size) != 0) return false;
    }
    if (first) {
      torch_offsets_.clear();
      for (std::size_t k = 0, at = 0; k < n; ++k) {
        torch_offsets_.push_back(at);
        at += 2 + 2 * static_cast<std::size_t>(layout[at]);
      }
      torch_layout_ = std::move(layout);
      torch_mask_ = std::move(mask);
      torch_params_.clear();
      for (std::size_t i = 0; i < m; ++i)
        torch_params_.push_back(py::reinterpret_borrow<py::object>(PyList_GET_ITEM(params.ptr(), i)));
    }
    for (std::size_t k = 0; k < n; ++k) {
      plan_.tensors[k].grad = bound[k].first;
      plan_.set_grad_dtype(k, bound[k].second);
    }
    grads_ = std::move(grads);
    bound_ = true;
    return true;
  }

  // Whether a tensor of `shape` and `strides` (elements) fills its memory exactly once (any
  // order of its dimensions: contiguous, transposed, channels-last): no element skipped or
  // repeated (an expanded, stride-0 view is not).
  static bool dense(int ndim, const int64_t* shape, const int64_t* strides) {
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, extent) of the extents > 1
    for (int d = 0; d < ndim; ++d)
      if (shape[d] > 1) dims.emplace_back(strides[d], shape[d]);
    std::sort(dims.begin(), dims.end());
    int64_t expect = 1;
    for (const auto& [stride, extent] : dims) {
      if (stride != expect) return false;
      expect *= extent;
    }
    return true;
  }

  // `method(self)` is True: 1, False: 0, an error (cleared): -1; `fn`: its C function, called
  // directly where not null.
  static int is_true(PyCFunction fn, PyObject* method, PyObject* self) {
    PyObject* r = fn != nullptr ? fn(self, nullptr) : PyObject_Vectorcall(method, &self, 1, nullptr);
    if (r == nullptr) {
      PyErr_Clear();
      return -1;
    }
    const int out = r == Py_True ? 1 : 0;
    Py_DECREF(r);
    return out;
  }

  // Whether the byte ranges `ranges` (gradients) overlap neither each other nor any array of
  // the plan (sorts `ranges`): one walk along both lists sorted by address.
  bool disjoint_from_plan(std::vector<Range>& ranges) const {
    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
    for (std::size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].lo < ranges[i - 1].hi) return false;
    std::size_t k = 0;  // params and states: disjoint, sorted by address
    for (const Range& g : ranges) {  // (disjoint and sorted: hi grows too)
      while (k < spans_.size() && spans_[k].hi <= g.lo) ++k;
      if (k < spans_.size() && spans_[k].lo < g.hi) return false;
    }
    return true;
  }

  // The plan, after checking (GIL held) that no array it writes (parameters, states and their
  // scales, master copies, compensations, copy-outs, EMAs) was made read-only, resized or
  // reallocated since the plan was built: its recorded pointers would write into memory the
  // array no longer owns.
  const Plan& plan() const {
    if (!bound_) throw py::value_error("no gradients bound to this plan");
    check_arrays();
    return plan_;
  }
  // That check alone (gradients bound or not).
  void check_arrays() const {
    for (const Watched& w : watched_) {
      if (w.arr.data() != w.data || w.arr.size() != w.size)
        throw py::value_error(
            w.what + ": the array was resized or its memory replaced since it was given to the "
            "optimizer; " + (w.what.rfind("copy-out", 0) == 0
                                 ? "give it again (set_copy_out) or remove it (set_copy_out(None))"
                                 : "build a new optimizer for it"));
      if (!w.arr.writeable()) throw py::value_error(w.what + ": array was made read-only");
      if (w.layout && w.re_viewed())
        throw py::value_error(w.what + ": the array's dtype, shape or strides were changed in "
                              "place since it was given to the optimizer; build a new "
                              "optimizer for it");
    }
  }
  // Steps completed on this plan (counted inside the compiled call, before it returns: Python
  // code can tell whether a step whose call was interrupted on its way back happened).
  int64_t completed() const { return completed_; }
  void count_step() { ++completed_; }
  // Forget the bound gradients (the next step binds again), so that they are not kept alive.
  void release_grads() {
    grads_.clear();
    for (Tensor& t : plan_.tensors) t.grad = nullptr;
    bound_ = false;
  }
  std::size_t size() const { return plan_.tensors.size(); }
  int64_t numel() const { return plan_.total(); }
  const std::vector<std::string>& state_names() const { return state_names_; }

 private:
  Plan plan_;
  std::vector<std::string> nouns_, state_names_;
  std::vector<Span> spans_;
  std::vector<py::array> params_;
  // every array the plan writes (keeping it alive), where its data was and its size
  struct Watched {
    py::array arr;
    const void* data;
    py::ssize_t size;
    py::dtype dtype;  // and its layout, which the plan's kernels and pointers assume
    std::vector<py::ssize_t> shape, strides;
    std::string what;
    bool layout;  // check dtype, shape and strides too
    // The array re-viewed in place since (`a.dtype = ...`, `a.shape = ...`, `a.strides = ...`:
    // the same memory read as another type or order).
    // (Read from the array object's fields, no reference taken: a few ns per array and step.)
    bool re_viewed() const {
      const auto* a = py::detail::array_proxy(arr.ptr());
      if (a->descr != dtype.ptr() && !arr.dtype().equal(dtype)) return true;
      return static_cast<std::size_t>(a->nd) != shape.size() ||
             !std::equal(shape.begin(), shape.end(), a->dimensions) ||
             !std::equal(strides.begin(), strides.end(), a->strides);
    }
  };
  std::vector<Watched> watched_;
  std::vector<py::object> grads_;  // the bound gradients (arrays or DLPack capsules)
  std::vector<const void*> param_data_;  // where each parameter's data was
  // bind_torch's record: per tensor of the group, whether it has a gradient (is the plan's);
  // per parameter of the plan, its ndim, shape, strides and dtype (at torch_offsets_[j])
  std::vector<py::object> torch_params_;  // the group's tensors (identity)
  std::vector<char> torch_mask_;
  std::vector<int64_t> torch_layout_;
  std::vector<std::size_t> torch_offsets_;
  // (watch_torch) a state tensor, where its data was and its layout (append_layout)
  struct WatchedState {
    py::object tensor;
    const void* data;
    std::vector<int64_t> layout;
  };
  std::vector<WatchedState> torch_states_;
  // A tensor's layout appended to `v`: ndim, shape, strides (-1 each where DLPack gives none:
  // contiguous) and dtype; 2 + 2 ndim values.  same_layout: whether `t` has the layout recorded
  // at `rec` (the record's ndim first, so a tensor of another ndim reads no further).
  static void append_layout(std::vector<int64_t>& v, const DLTensor& t) {
    v.push_back(t.ndim);
    v.insert(v.end(), t.shape, t.shape + t.ndim);
    if (t.strides != nullptr) v.insert(v.end(), t.strides, t.strides + t.ndim);
    else v.insert(v.end(), static_cast<std::size_t>(t.ndim), int64_t{-1});
    v.push_back(dtype_key(t.dtype));
  }
  static bool same_layout(const DLTensor& t, const int64_t* rec) {
    const int n = t.ndim;
    if (rec[0] != n || !std::equal(t.shape, t.shape + n, rec + 1)) return false;
    const int64_t* strides = rec + 1 + n;
    const bool same = t.strides == nullptr
                          ? std::all_of(strides, strides + n, [](int64_t x) { return x == -1; })
                          : std::equal(t.strides, t.strides + n, strides);
    return same && strides[n] == dtype_key(t.dtype);
  }
  std::vector<py::array> torch_scalars_;
  // bind_torch's scratch (kept: no allocation per step): the gradients' byte ranges, pointers
  std::vector<Range> scratch_ranges_;
  std::vector<std::pair<const void*, DType>> scratch_bound_;
  bool bound_ = false;
  int64_t completed_ = 0;
  // In a forked child, the mutex may be held by a thread that does not exist there: the first
  // lock after a fork (under the GIL, so by one thread) abandons it for a new one.
  std::mutex& mutex() {
    if (forks_ != fork_count()) {
      (void)mu_.release();  // never destroyed: it may be locked
      mu_ = std::make_unique<std::mutex>();
      forks_ = fork_count();
    }
    return *mu_;
  }
  std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
  int forks_ = fork_count();
};

// The identities of a dict's keys and values and, for each value that is a dict, of its keys
// and values (references held: no address is reused meanwhile).  `same(d)` tells, without
// calling any Python code, whether `d` holds exactly these objects in this order:
// fastoptim.torch's test that nothing replaced any state tensor since its last step (about
// 10 ns per entry, where hashing each parameter to look its state up costs 100).
// Where CPython keeps a version per dict (PEP 509: any change of a dict gives it a new one;
// 3.9-3.11, deprecated since), a dict whose version did not change since it was last compared
// is not walked: one comparison per dict instead of one per entry.
#if PY_VERSION_HEX < 0x030C0000
#define FASTOPTIM_DICT_VERSIONS 1
#endif
class Snapshot {
 public:
  explicit Snapshot(const py::dict& d) {
    record(d.ptr(), 0);
    versions_ = current_versions();
  }
  bool same(const py::handle& d) const {
    if (!PyDict_Check(d.ptr())) return false;
#ifdef FASTOPTIM_DICT_VERSIONS
    if (d.ptr() == dicts_[0].ptr() && unchanged()) return true;
#endif
    std::size_t at = 0, sizes = 0;
    if (!(compare(d.ptr(), 0, at, sizes) && at == objs_.size())) return false;
    versions_ = current_versions();  // (the same objects: `d` is the recorded dict)
    return true;
  }

 private:
#ifdef FASTOPTIM_DICT_VERSIONS
  bool unchanged() const {
    for (std::size_t i = 0; i < dicts_.size(); ++i)
      if (reinterpret_cast<PyDictObject*>(dicts_[i].ptr())->ma_version_tag != versions_[i])
        return false;
    return true;
  }
#endif
  // The version of every recorded dict (empty where CPython keeps none).
  std::vector<uint64_t> current_versions() const {
    std::vector<uint64_t> out;
#ifdef FASTOPTIM_DICT_VERSIONS
    out.reserve(dicts_.size());
    for (const py::object& d : dicts_)
      out.push_back(reinterpret_cast<PyDictObject*>(d.ptr())->ma_version_tag);
#endif
    return out;
  }
  void record(PyObject* d, int depth) {
    dicts_.push_back(py::reinterpret_borrow<py::object>(d));
    sizes_.push_back(PyDict_GET_SIZE(d));
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
      objs_.push_back(py::reinterpret_borrow<py::object>(k));
      objs_.push_back(py::reinterpret_borrow<py::object>(v));
      if (depth == 0 && PyDict_Check(v)) record(v, 1);
    }
  }
  bool compare(PyObject* d, int depth, std::size_t& at, std::size_t& sizes) const {
    if (sizes == sizes_.size() || PyDict_GET_SIZE(d) != sizes_[sizes++]) return false;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
      if (at + 2 > objs_.size() || objs_[at].ptr() != k || objs_[at + 1].ptr() != v) return false;
      at += 2;
      if (depth == 0 && PyDict_Check(v) && !compare(v, 1, at, sizes)) return false;
    }
    return true;
  }
  std::vector<py::object> objs_;  // key, value, ... (a dict value's items follow it)
  std::vector<Py_ssize_t> sizes_;  // each dict's size, in the order met
  std::vector<py::object> dicts_;  // each dict, in the order met (the first: the recorded one)
  mutable std::vector<uint64_t> versions_;  // their versions when last found the same
};

// One step of one or several plans (an optimizer's groups) in one call: every plan is locked
// (where `lock`; else the caller holds the lock of its one plan) and checked before any kernel runs, then every
// plan is stepped on a copy of its hyper-parameters without the GIL (Python code touching them
// meanwhile races with nothing), so that the step happens whole or not at all (an interrupt
// surfaces only after the call returns).  Then each plan's hyper-parameters are updated (NAdam's
// running product), its step counted, and its gradients forgotten where `release[i]`.
// Lock every plan of `plans` (after checking that none is None and none is listed twice: its
// mutex would wait for itself), in address order, so that two calls locking some of the same
// plans from two threads never wait for each other in a cycle.
std::vector<std::unique_ptr<PyPlan::Lock>> lock_plans(PyPlan* const* plans, std::size_t n) {
  std::vector<PyPlan*> order(plans, plans + n);
  for (std::size_t i = 0; i < n; ++i)
    if (order[i] == nullptr) throw py::type_error("plans[" + std::to_string(i) + "] is None");
  std::sort(order.begin(), order.end(), std::less<PyPlan*>());
  if (std::adjacent_find(order.begin(), order.end()) != order.end())
    throw py::value_error("plans: a plan is listed twice");
  std::vector<std::unique_ptr<PyPlan::Lock>> locks;
  locks.reserve(n);
  for (PyPlan* p : order) locks.push_back(std::make_unique<PyPlan::Lock>(*p));
  return locks;
}

template <class Opt>
void run_steps(std::size_t n, PyPlan* const* plans, typename Opt::Hyper* const* hypers,
               const int64_t* steps, const bool* release, bool lock) {
  using Hyper = typename Opt::Hyper;
  for (std::size_t i = 0; i < n; ++i)
    if (hypers[i] == nullptr) throw py::type_error("hypers[" + std::to_string(i) + "] is None");
  std::vector<std::unique_ptr<PyPlan::Lock>> locks;
  if (lock) locks = lock_plans(plans, n);
  std::vector<const Plan*> ps;
  ps.reserve(n);
  for (std::size_t i = 0; i < n; ++i) ps.push_back(&plans[i]->plan());  // every check first
  std::vector<Hyper> local;
  local.reserve(n);
  for (std::size_t i = 0; i < n; ++i) local.push_back(*hypers[i]);
  {
    py::gil_scoped_release unlocked;
    for (std::size_t i = 0; i < n; ++i) fastoptim::step<Opt>(*ps[i], local[i], steps[i]);
  }
  for (std::size_t i = 0; i < n; ++i) {
    *hypers[i] = local[i];
    plans[i]->count_step();
    if (release[i]) plans[i]->release_grads();
  }
}

template <class Opt>
void bind_optimizer(py::module_& m, const char* cls_name, const char* fn_name,
                    const char* steps_name) {
  using Hyper = typename Opt::Hyper;
  py::class_<Hyper> cls(m, cls_name);
  cls.def(py::init<>());
  Opt::fields([&](const char* name, auto member) { cls.def_readwrite(name, member); });
  cls.def("state_names", [](const Hyper& h) {
    std::vector<std::string> out;
    for (const char* s : Opt::states(Opt::variant(h))) out.emplace_back(s);
    return out;
  }, "Names of the state buffers (in plan order) these hyper-parameters need.");
  cls.def("__repr__", [cls_name](const Hyper& h) {
    std::string r = std::string(cls_name) + "(";
    bool first = true;
    Opt::fields([&](const char* name, auto member) {
      r += (first ? "" : ", ") + std::string(name) + "=" + std::string(py::repr(py::cast(h.*member)));
      first = false;
    });
    return r + ")";
  });
  m.def(fn_name, [](PyPlan& plan, Hyper& h, int64_t step, const py::object& grads, bool release) {
    PyPlan::Lock lock(plan);
    if (!grads.is_none()) plan.bind_grads_locked(grads);
    PyPlan* p = &plan;
    Hyper* hp = &h;
    run_steps<Opt>(1, &p, &hp, &step, &release, false);
  }, py::arg("plan"), py::arg("hyper"), py::arg("step"), py::arg("grads") = py::none(),
  py::arg("release") = false,
  "One in-place step of every tensor of `plan` (binding `grads` first when given; forgetting "
  "the gradients afterwards when `release`).");
  m.def(steps_name, [](const std::vector<PyPlan*>& plans, const std::vector<Hyper*>& hypers,
                       const std::vector<int64_t>& steps, const std::vector<bool>& release) {
    const std::size_t n = plans.size();
    if (hypers.size() != n || steps.size() != n || release.size() != n)
      throw py::value_error("plans, hypers, steps and release must have the same length");
    if (n == 0) return;
    const std::unique_ptr<bool[]> rel(new bool[n]);
    std::copy(release.begin(), release.end(), rel.get());
    run_steps<Opt>(n, plans.data(), hypers.data(), steps.data(), rel.get(), true);
  }, py::arg("plans"), py::arg("hypers"), py::arg("steps"), py::arg("release"),
  "One in-place step of every group's plan (all checked first), each with its own step number.");
}

// Sparse row updates (fastoptim::step_rows): rows_<name>(jobs), each job a tuple (hyper, step,
// param, index, rows, states, label): one optimizer step of several parameters, all-or-nothing.
// Every job is checked (dtypes, shapes, indices in range and strictly increasing) and no two
// arrays of any jobs may share memory before any element is written; the GIL is released once.
template <class Opt> void bind_rows(py::module_& m, const char* fn_name) {
  using Hyper = typename Opt::Hyper;
  m.def(fn_name, [](const py::sequence& jobs, const py::object& ran) {
    if (!ran.is_none() && !py::isinstance<py::list>(ran))
      throw py::type_error("ran: expected a list or None, got " + type_name(ran));
    const auto njobs = static_cast<std::size_t>(py::len(jobs));
    std::vector<Rows> rs(njobs);
    std::vector<Hyper> hs;
    std::vector<int64_t> steps;
    std::vector<Span> spans;
    std::vector<py::array> keep;  // every array, alive while the GIL is released
    // the indices, copied: checked, then read by the kernels while the GIL is released (another
    // thread could change the caller's array in between)
    std::vector<std::vector<int64_t>> indices(njobs);
    hs.reserve(njobs);
    steps.reserve(njobs);
    for (std::size_t q = 0; q < njobs; ++q) {
      const py::handle item = jobs[q];
      if (!py::isinstance<py::tuple>(item) || py::len(item) != 7)
        throw py::type_error("jobs[" + std::to_string(q) + "]: expected a tuple (hyper, step, "
                             "param, index, rows, states, label), got " + type_name(item));
      const auto t = py::reinterpret_borrow<py::tuple>(item);
      const std::string jobname = "jobs[" + std::to_string(q) + "]";
      const auto cast = [&](int at, const char* field, auto* out) {
        try {
          *out = py::cast<std::remove_pointer_t<decltype(out)>>(t[at]);
        } catch (const py::cast_error&) {
          throw py::type_error(jobname + ": " + field + " must be " +
                               (at == 0   ? "these hyper-parameters"
                                : at == 1 ? "an int (int64)"
                                          : "a str") +
                               ", got " + type_name(t[at]));
        }
      };
      std::string label;
      cast(6, "label", &label);
      const std::string what = param_noun(label);
      Hyper h;
      cast(0, "hyper", &h);
      hs.push_back(h);
      int64_t step = 0;
      cast(1, "step", &step);
      steps.push_back(step);
      if (steps.back() < 1) throw py::value_error(what + ": step must be >= 1");
      const Arg p = check_array(t[2], what, true);
      if (p.dtype != DType::f32 && p.dtype != DType::f64)
        throw py::type_error(what + ": row updates take float32 or float64 parameters, got " +
                             dtype_name(p.arr));
      if (p.arr.ndim() < 1) throw py::value_error(what + ": a row update needs at least one dimension");
      const Arg r = check_array(t[4], "rows for " + what, false);
      const bool same_rows = r.arr.ndim() == p.arr.ndim() &&
                             std::equal(r.arr.shape() + 1, r.arr.shape() + r.arr.ndim(), p.arr.shape() + 1);
      if (r.dtype != p.dtype)
        throw py::type_error("rows for " + what + ": dtype " + dtype_name(r.arr) +
                             " does not match the parameter's " + dtype_name(p.arr));
      if (!same_rows)
        throw py::value_error("rows for " + what + ": shape " + shape_str(r.arr) +
                              " is not (k,) + the parameter's row shape " + shape_str(p.arr) + "[1:]");
      const py::handle index = t[3];
      if (!py::isinstance<py::array>(index))
        throw py::type_error("indices for " + what + ": expected a numpy.ndarray, got " + type_name(index));
      const auto ix = py::reinterpret_borrow<py::array>(index);
      if (!ix.dtype().equal(py::dtype::of<int64_t>()) || ix.ndim() != 1 ||
          !(ix.flags() & py::array::c_style))
        throw py::type_error("indices for " + what + ": need a 1-D C-contiguous int64 array, got " +
                             dtype_name(ix) + " " + shape_str(ix));
      if (ix.shape(0) != r.arr.shape(0))
        throw py::value_error("indices for " + what + ": " + std::to_string(ix.shape(0)) +
                              " indices for " + std::to_string(r.arr.shape(0)) + " rows");
      Rows& job = rs[q];
      job.dtype = p.dtype;
      job.param = p.data;
      job.nrows = p.arr.shape(0);
      job.width = 1;
      for (py::ssize_t d = 1; d < p.arr.ndim(); ++d) job.width *= p.arr.shape(d);
      const auto* given = static_cast<const int64_t*>(ix.data());
      indices[q].assign(given, given + ix.shape(0));
      job.index = indices[q].data();
      job.k = ix.shape(0);
      job.rows = r.data;
      for (int64_t i = 0; i < job.k; ++i) {
        const int64_t at = job.index[i];
        if (at < 0 || at >= job.nrows)
          throw py::index_error("indices for " + what + ": index " + std::to_string(at) +
                                " is out of range for " + std::to_string(job.nrows) + " rows");
        if (i > 0 && at <= job.index[i - 1])
          throw py::value_error("indices for " + what + ": must be strictly increasing (coalesced)");
      }
      const py::sequence states = t[5];
      const auto n = static_cast<std::size_t>(py::len(states));
      const int need = Opt::nstate(Opt::variant(hs.back()));
      if (n != static_cast<std::size_t>(need))
        throw py::value_error("states of " + what + ": " + std::to_string(n) +
                              " arrays, these hyper-parameters need " + std::to_string(need));
      keep.insert(keep.end(), {p.arr, r.arr});
      if (p.size) spans.push_back({p.lo, p.hi, what});
      if (r.size) spans.push_back({r.lo, r.hi, "rows for " + what});
      const auto names = Opt::states(Opt::variant(hs.back()));
      for (std::size_t j = 0; j < n; ++j) {
        const std::string sw = std::string("state '") + names[j] + "' of " + what;
        const Arg a = check_array(states[j], sw, true);
        if (a.dtype != p.dtype)
          throw py::type_error(sw + ": dtype " + dtype_name(a.arr) + " does not match the parameter's " +
                               dtype_name(p.arr));
        check_shape(a, p.arr, sw);
        job.state[j] = a.data;
        keep.push_back(a.arr);
        if (a.size) spans.push_back({a.lo, a.hi, sw});
      }
      job.nstate = static_cast<int>(n);
    }
    sort_and_check_disjoint(spans);  // across every job: no array written twice or read after
    {
      py::gil_scoped_release release;
      fastoptim::step_rows<Opt>(rs.data(), hs.data(), steps.data(), njobs);
    }
    // Before returning: an interrupt that surfaces once the call is back in Python finds it.
    if (!ran.is_none()) py::reinterpret_borrow<py::list>(ran).append(true);
  }, py::arg("jobs"), py::arg("ran") = py::none(),
  "One optimizer step of sparse row updates, all-or-nothing: for each job (hyper, step, param, "
  "index, rows, states, label), the rows `index` (int64, strictly increasing) of `param` updated "
  "with the gradient rows `rows` (len(index) x param's row shape) and step number `step`; the "
  "other rows and their state are untouched.  Every job is checked (and no two arrays may share "
  "memory) before any element is written; errors name the job's parameter by its label.  `ran`: "
  "a list that True is appended to once the step has happened (before the call returns).");
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::neon})
    if (name == isa_name(isa)) return isa;
  throw py::value_error("unknown instruction set '" + name + "' (known: scalar, avx2, avx512, neon)");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastoptim's compiled core (private; use the fastoptim package).";

  py::class_<PyPlan>(m, "Plan")
      .def(py::init<const py::sequence&, const std::vector<std::string>&,
                    const std::vector<std::string>&, const py::sequence&, const py::object&,
                    const py::object&, const py::object&,
                    const std::optional<std::vector<uint64_t>>&, const py::object&,
                    const std::optional<std::vector<std::string>>&>(),
           py::arg("params"), py::arg("labels"), py::arg("state_names"), py::arg("states"),
           py::kw_only(), py::arg("masters") = py::none(), py::arg("comps") = py::none(),
           py::arg("outs") = py::none(), py::arg("ids") = py::none(),
           py::arg("emas") = py::none(), py::arg("qmaps") = py::none())
      .def("set_rounding", &PyPlan::set_rounding, py::arg("mode"), py::arg("seed") = 0)
      .def_property_readonly("rounding", &PyPlan::rounding)
      .def_property_readonly("seed", &PyPlan::seed)
      .def("bind_grads", &PyPlan::bind_grads, py::arg("grads"))
      .def("check", [](PyPlan& p) {
        PyPlan::Lock lock(p);
        p.check_arrays();
      }, "What a step checks of the plan's arrays (not made read-only, resized, reallocated or "
         "re-viewed since): ValueError naming the array, else nothing.")
      .def("release_grads", [](PyPlan& p) {
        PyPlan::Lock lock(p);
        p.release_grads();
      }, "Forget the bound gradients (a step needs new ones), so that they are not kept alive.")
      .def("watch_torch", &PyPlan::watch_torch, py::arg("states"), py::arg("scalars"),
           "fastoptim.torch: the state tensors and packed scalar buffers behind the plan's "
           "arrays; bind_torch declines once a tensor's memory moved or a buffer holds two "
           "values.")
      .def("bind_torch", &PyPlan::bind_torch, py::arg("params"),
           "fastoptim.torch: bind the `grad` of the group's tensors `params` if every check "
           "passes (see set_torch_api); False, binding nothing, otherwise.")
      .def("set_grad_transform", &PyPlan::set_grad_transform, py::arg("mul"), py::arg("clip"))
      .def_property_readonly("grad_mul", &PyPlan::grad_mul)
      .def_property_readonly("grad_clip", &PyPlan::grad_clip)
      .def("set_ema_decay", &PyPlan::set_ema_decay, py::arg("decay"))
      .def_property_readonly("ema_decay", &PyPlan::ema_decay)
      .def("grad_stats", &PyPlan::stats,
           "(sum of squares of the transformed gradients, whether every gradient is finite)")
      .def_property_readonly("completed", &PyPlan::completed)
      .def("__len__", &PyPlan::size)
      .def_property_readonly("numel", &PyPlan::numel)
      .def_property_readonly("state_names", &PyPlan::state_names);

#define FASTOPTIM_BIND(Opt, name) \
  bind_optimizer<Opt>(m, #Opt "Hyper", "step_" #name, "steps_" #name);
  FASTOPTIM_OPTIMIZERS(FASTOPTIM_BIND)
#undef FASTOPTIM_BIND
#define FASTOPTIM_BIND(Opt, name) bind_rows<Opt>(m, "rows_" #name);
  FASTOPTIM_ROW_OPTIMIZERS(FASTOPTIM_BIND)
#undef FASTOPTIM_BIND

  m.def("quant_map", [](const std::string& name) {
    const QTables& q = qtables(qmap_from_name(name));
    py::array_t<float> out(q.ncodes);
    std::copy(q.value, q.value + q.ncodes, out.mutable_data());
    return out;
  }, py::arg("name"),
  "The values of quantization map `name` ('signed8', 'unsigned8', 'signed4', 'unsigned4'), by code.");
  m.def("quantize_blockwise", [](const py::handle& values, const py::handle& codes,
                                 const py::handle& absmax, const std::string& map) {
    const Arg v = check_array(values, "values", false);
    if (v.dtype != DType::f32) throw py::type_error("values: must be float32, got " + dtype_name(v.arr));
    const QMap qm = qmap_from_name(map);
    const auto [c, a] = check_quantized(py::make_tuple(codes, absmax), v.arr, DType::f32,
                                        "quantized", is_map4(qm) ? 4 : 8);
    std::vector<Span> spans;  // (values is read while codes and absmax are written)
    for (const auto* x : {&v, &c, &a})
      if (x->size) spans.push_back({x->lo, x->hi, x == &v ? "values" : x == &c ? "codes" : "absmax"});
    sort_and_check_disjoint(spans);
    const auto* src = static_cast<const float*>(v.data);
    auto* dst = static_cast<uint8_t*>(c.data);
    auto* am = static_cast<float*>(a.data);
    py::gil_scoped_release release;
    quantize_blockwise(src, v.size, qm, dst, am);
  }, py::arg("values"), py::arg("codes"), py::arg("absmax"), py::arg("map"),
  "Quantize float32 `values` block-wise into `codes` and `absmax` (float32, one per block) with "
  "map `map`, on the active ISA and threads (the same codes whatever those): 8-bit maps in blocks of 256, codes uint8 shaped like `values`; 4-bit maps in "
  "blocks of 128, codes packed two per byte into a 1-D uint8 array of (size + 1) // 2 bytes "
  "(element 2i in the high nibble).");
  m.def("dequantize_blockwise", [](const py::handle& codes, const py::handle& absmax,
                                   const py::handle& out, const std::string& map) {
    const Arg o = check_array(out, "out", true);
    if (o.dtype != DType::f32) throw py::type_error("out: must be float32, got " + dtype_name(o.arr));
    const QMap qm = qmap_from_name(map);
    const auto [c, a] = check_quantized(py::make_tuple(codes, absmax), o.arr, DType::f32,
                                        "quantized", is_map4(qm) ? 4 : 8);
    std::vector<Span> spans;  // (out is written while codes and absmax are read)
    for (const auto* x : {&o, &c, &a})
      if (x->size) spans.push_back({x->lo, x->hi, x == &o ? "out" : x == &c ? "codes" : "absmax"});
    sort_and_check_disjoint(spans);
    const auto* src = static_cast<const uint8_t*>(c.data);
    const auto* am = static_cast<const float*>(a.data);
    auto* dst = static_cast<float*>(o.data);
    py::gil_scoped_release release;
    dequantize_blockwise(src, am, o.size, qm, dst);
  }, py::arg("codes"), py::arg("absmax"), py::arg("out"), py::arg("map"),
  "Dequantize block-wise quantized state into float32 `out` (the layouts of quantize_blockwise).");

  m.def("check_disjoint", [](const py::sequence& arrays, const std::vector<std::string>& labels) {
    if (static_cast<std::size_t>(py::len(arrays)) != labels.size())
      throw py::value_error("labels: need one label per array");
    std::vector<Span> spans;
    for (std::size_t i = 0; i < labels.size(); ++i) {
      const py::handle h = arrays[i];
      if (!py::isinstance<py::array>(h)) throw py::type_error(labels[i] + ": expected a numpy.ndarray, got " + type_name(h));
      const auto a = py::reinterpret_borrow<py::array>(h);
      if (!(a.flags() & py::array::c_style))  // (its memory would not be [data, data + nbytes))
        throw py::value_error(labels[i] + ": array is not C-contiguous (shape " + shape_str(a) + ")");
      const auto lo = reinterpret_cast<std::uintptr_t>(a.data());
      if (a.size()) spans.push_back({lo, lo + static_cast<std::uintptr_t>(a.nbytes()), labels[i]});
    }
    sort_and_check_disjoint(spans);
  }, py::arg("arrays"), py::arg("labels"),
  "Raise ValueError naming the first two arrays whose memory overlaps, or an array that is not "
  "C-contiguous.");
  py::class_<Snapshot>(m, "Snapshot")
      .def(py::init<const py::dict&>(), py::arg("d"))
      .def("same", &Snapshot::same, py::arg("d"),
           "Whether `d` holds exactly the keys and values (identities) it held when recorded, "
           "and so do its dict values.");
  m.def("set_torch_api", [](const py::capsule& api, const py::type& tensor, const py::type& parameter) {
    auto* table = static_cast<DLPackExchangeAPI*>(PyCapsule_GetPointer(api.ptr(), "dlpack_exchange_api"));
    if (table == nullptr) {
      PyErr_Clear();
      return false;
    }
    TorchApi& t = torch_api();
    if (table->header.version.major != 1 || table->header.version.minor < 2 ||
        table->dltensor_from_py_object_no_sync == nullptr)
      return false;
    t.is_view = tensor.attr("_is_view");
    t.is_neg = tensor.attr("is_neg");
    t.is_conj = tensor.attr("is_conj");
    t.is_view_fn = noargs_function(t.is_view);
    t.is_neg_fn = noargs_function(t.is_neg);
    t.is_conj_fn = noargs_function(t.is_conj);
    // torch.Tensor.grad: the data descriptor of torch's C tensor type (a getter), the same for
    // Parameter; else every `p.grad` is looked up.
    py::object grad = tensor.attr("grad");
    t.get_grad = nullptr;
    if (Py_IS_TYPE(grad.ptr(), &PyGetSetDescr_Type) && parameter.attr("grad").ptr() == grad.ptr()) {
      PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(grad.ptr())->d_getset;
      t.grad_descr = grad.ptr();
      t.get_grad = def->get;
      t.grad_closure = def->closure;
      t.tags[0] = t.tags[1] = 0;  // (recorded by grad_of's first lookup)
    }
    t.keep = py::make_tuple(api, tensor, parameter, grad);
    t.tensor = reinterpret_cast<PyTypeObject*>(tensor.ptr());
    t.parameter = reinterpret_cast<PyTypeObject*>(parameter.ptr());
    t.describe = table->dltensor_from_py_object_no_sync;
    return true;
  }, py::arg("api"), py::arg("tensor"), py::arg("parameter"),
  "Give Plan.bind_torch DLPack's exchange API (the capsule torch.Tensor.__dlpack_c_exchange_api__) "
  "and the types torch.Tensor and torch.nn.Parameter; False if the API is not one it can use.");
  m.def("isa", [] { return std::string(isa_name(active_isa())); });
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa isa : available_isas()) out.emplace_back(isa_name(isa));
    return out;
  });
  m.def("set_isa", [](const std::string& name) { set_isa(isa_from_name(name)); }, py::arg("name"));
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Threads for large steps (n >= 1; values above max_threads() use max_threads()).");
  m.def("get_num_threads", &get_num_threads);
  m.def("max_threads", &max_threads, "The most threads a step uses: 4 x the CPUs available.");
  m.def("available_cpus", &available_cpus,
        "CPUs available to the process at load: affinity mask, capped by its cgroups' CPU quota.");
  m.def("_cgroup_cpu_limit", &cgroup_cpu_limit, py::arg("root"),
        "The smallest CPU quota of the process's cgroups as ceil(quota / period), 0 for none; "
        "every path under `root` (tests).");
  m.def("set_grain", &set_grain, py::arg("bytes"),
        "Bytes of memory traffic per thread below which a step uses fewer threads.");
  m.def("get_grain", &get_grain);
  m.def("stream_mixed", [](const py::sequence& rw, const py::handle& grad, const py::object& out,
                           const py::object& codes) {
    StreamArrays s;
    std::vector<Span> spans;
    int64_t n = -1;
    auto take = [&](py::handle h, const std::string& what, bool writeable) {
      Arg a = check_array(h, what, writeable);
      if (a.dtype == DType::f64) throw py::type_error("stream_mixed: " + what + " is float64");
      if (n >= 0 && a.size != n) throw py::value_error("stream_mixed: arrays must have equal sizes");
      n = a.size;
      if (a.size) spans.push_back({a.lo, a.hi, what});
      return a;
    };
    for (std::size_t j = 0; j < static_cast<std::size_t>(py::len(rw)); ++j) {
      Arg a = take(rw[j], "rw[" + std::to_string(j) + "]", true);
      if (a.dtype == DType::f32) {
        if (s.nrw32 == 4) throw py::value_error("stream_mixed: at most 4 float32 arrays");
        s.rw32[s.nrw32++] = static_cast<float*>(a.data);
      } else {
        if (s.nrw16 == 4) throw py::value_error("stream_mixed: at most 4 16-bit arrays");
        s.rw16[s.nrw16++] = static_cast<uint16_t*>(a.data);
      }
    }
    Arg g = take(grad, "grad", false);
    if (g.dtype == DType::f32)
      s.grad32 = static_cast<const float*>(g.data);
    else
      s.grad16 = static_cast<const uint16_t*>(g.data);
    if (!out.is_none()) {
      Arg o = take(out, "out", true);
      if (o.dtype == DType::f32) throw py::type_error("stream_mixed: out must be 16-bit");
      s.out16 = static_cast<uint16_t*>(o.data);
    }
    if (!codes.is_none()) {
      Arg c = check_codes(codes, "codes");
      if (c.size != n) throw py::value_error("stream_mixed: arrays must have equal sizes");
      if (c.size) spans.push_back({c.lo, c.hi, "codes"});
      s.rw8 = static_cast<uint8_t*>(c.data);
    }
    sort_and_check_disjoint(spans);
    py::gil_scoped_release release;
    stream_mixed(s, n);
  }, py::arg("rw"), py::arg("grad"), py::arg("out") = py::none(), py::arg("codes") = py::none(),
  "Roofline kernel of a mixed-precision layout: one fused pass reading and writing every array "
  "of `rw` (float32 or 16-bit), reading `grad`, writing `out` (16-bit) and reading and writing "
  "`codes` (uint8: 1 B per element, as a 4-bit state's two packed code arrays) when given.");
  m.def("accumulate", [](const std::vector<PyPlan*>& plans, double scale) {
    if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
    const auto locks = lock_plans(plans.data(), plans.size());
    std::vector<const Plan*> ps;
    for (PyPlan* p : plans) ps.push_back(&p->plan());  // every check before any pass
    py::gil_scoped_release release;
    for (const Plan* p : ps) accumulate(*p, scale);
  }, py::arg("plans"), py::arg("scale"),
  "Each plan's params (gradient buffers) += scale * its bound gradients, all plans checked "
  "first.");
  m.def("stream_read", [](const py::handle& array) {
    Arg a = check_array(array, "array", false);
    if (a.dtype != DType::f32) throw py::type_error("stream_read: the array must be float32");
    py::gil_scoped_release release;
    return stream_read(static_cast<const float*>(a.data), a.size);
  }, py::arg("array"), "The roofline of a read-only pass: the sum of a float32 array, read once.");
  m.def("combine", [](const py::handle& out, const py::handle& x, const py::handle& y,
                       double alpha, double beta, bool bf16) {
    const auto [o, a, b] = check_elementwise("combine", {"out", "x", "y"}, out, x, y);
    if (bf16 && o.dtype != DType::f32) throw py::type_error("combine: bf16 needs float32 arrays");
    py::gil_scoped_release release;
    if (o.dtype == DType::f32)
      combine(static_cast<float*>(o.data), static_cast<const float*>(a.data),
              static_cast<const float*>(b.data), static_cast<float>(alpha),
              static_cast<float>(beta), o.size, bf16);
    else
      combine(static_cast<double*>(o.data), static_cast<const double*>(a.data),
              static_cast<const double*>(b.data), alpha, beta, o.size);
  }, py::arg("out"), py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"),
  py::arg("bf16") = false,
  "out = alpha * x + beta * y (C-contiguous arrays of one float dtype; each product rounded "
  "before the sum), then rounded to bfloat16 (kept in float32) when bf16: the element-wise "
  "part of a Newton-Schulz iteration, on all threads.");
  m.def("lerp", [](const py::handle& out, const py::handle& a, const py::handle& b,
                    double weight) {
    const auto [o, x, y] = check_elementwise("lerp", {"out", "a", "b"}, out, a, b);
    py::gil_scoped_release release;
    if (o.dtype == DType::f32)
      lerp(static_cast<float*>(o.data), static_cast<const float*>(x.data),
           static_cast<const float*>(y.data), static_cast<float>(weight), o.size);
    else
      lerp(static_cast<double*>(o.data), static_cast<const double*>(x.data),
           static_cast<const double*>(y.data), weight, o.size);
  }, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("weight"),
  "out = lerp(a, b, weight) as torch.lerp evaluates it, from the nearer end: a + (b - a) * w "
  "when w < 0.5, else b - (b - a) * (1 - w), with w = weight in the arrays' dtype and every "
  "operation rounded to it (C-contiguous arrays of one float dtype; out may be a or b): Muon's "
  "momentum and Nesterov blend, on all threads.");
  m.def("symmetrize", [](const py::handle& a, bool bf16) {
    Arg x = check_array(a, "a", true);
    if (x.dtype != DType::f32 && x.dtype != DType::f64)
      throw py::type_error("symmetrize: a must be float32 or float64, got " + dtype_name(x.arr));
    if (x.arr.ndim() != 2 || x.arr.shape(0) != x.arr.shape(1))
      throw py::value_error("symmetrize: a must be a square 2-D array, got shape " +
                            shape_str(x.arr));
    if (bf16 && x.dtype != DType::f32) throw py::type_error("symmetrize: bf16 needs float32");
    const int64_t m = x.arr.shape(0);
    py::gil_scoped_release release;
    if (x.dtype == DType::f32)
      symmetrize(static_cast<float*>(x.data), m, bf16);
    else
      symmetrize(static_cast<double*>(x.data), m);
  }, py::arg("a"), py::arg("bf16") = false,
  "Make the square C-contiguous a symmetric in place from its upper triangle (the diagonal "
  "included; the lower triangle is overwritten, never read), after rounding every element to "
  "the nearest bfloat16 (kept in float32) when bf16: BLAS syrk's half result made whole, on all "
  "threads.");
  m.def("transpose", [](const py::handle& out, const py::handle& x) {
    Arg o = check_array(out, "out", true), a = check_array(x, "x", false);
    if (o.dtype != a.dtype || (o.dtype != DType::f32 && o.dtype != DType::f64))
      throw py::type_error("transpose: out and x must both be float32 or both float64");
    if (a.arr.ndim() != 2 || o.arr.ndim() != 2 || o.arr.shape(0) != a.arr.shape(1) ||
        o.arr.shape(1) != a.arr.shape(0))
      throw py::value_error("transpose: need a 2-D x and out of its transposed shape, got " +
                            shape_str(a.arr) + " and " + shape_str(o.arr));
    if (a.size && a.lo < o.hi && o.lo < a.hi)
      throw py::value_error("transpose: out overlaps x");
    const int64_t rows = a.arr.shape(0), cols = a.arr.shape(1);
    py::gil_scoped_release release;
    if (o.dtype == DType::f32)
      transpose(static_cast<float*>(o.data), static_cast<const float*>(a.data), rows, cols);
    else
      transpose(static_cast<double*>(o.data), static_cast<const double*>(a.data), rows, cols);
  }, py::arg("out"), py::arg("x"),
  "out = x.T for C-contiguous 2-D arrays of one float dtype (out of shape x.shape[::-1], not "
  "overlapping x), tile by tile on all threads.");
  m.def("divide", [](const py::handle& x, double divisor, bool bf16) {
    Arg a = check_array(x, "x", true);
    if (a.dtype != DType::f32 && a.dtype != DType::f64)
      throw py::type_error("divide: x must be float32 or float64, got " + dtype_name(a.arr));
    if (bf16 && a.dtype != DType::f32) throw py::type_error("divide: bf16 needs float32");
    py::gil_scoped_release release;
    if (a.dtype == DType::f32)
      divide(static_cast<float*>(a.data), static_cast<float>(divisor), a.size, bf16);
    else
      divide(static_cast<double*>(a.data), divisor, a.size);
  }, py::arg("x"), py::arg("divisor"), py::arg("bf16") = false,
  "x /= divisor in place (C-contiguous float32/float64; the divisor converted to x's dtype), "
  "then rounded to the nearest bfloat16 (kept in float32) when bf16, on all threads.");
  m.def("round_bfloat16", [](const py::handle& x) {
    Arg a = check_array(x, "x", true);
    if (a.dtype != DType::f32) throw py::type_error("round_bfloat16: x must be float32");
    py::gil_scoped_release release;
    round_bfloat16(static_cast<float*>(a.data), a.size);
  }, py::arg("x"), "Round float32 x to the nearest bfloat16 in place (kept in float32).");
  m.def("round_to", [](const py::handle& out, const py::handle& x) {
    const Arg o = check_array(out, "out", true), a = check_array(x, "x", false);
    if (a.dtype != DType::f32 || (o.dtype != DType::bf16 && o.dtype != DType::f16))
      throw py::type_error("round_to: x must be float32 and out bfloat16 or float16");
    if (a.size != o.size) throw py::value_error("round_to: out and x must have the same size");
    if (a.size && a.lo < o.hi && o.lo < a.hi) throw py::value_error("round_to: out overlaps x");
    py::gil_scoped_release release;
    round_to(static_cast<uint16_t*>(o.data), static_cast<const float*>(a.data), a.size,
             o.dtype == DType::bf16);
  }, py::arg("out"), py::arg("x"),
  "out = float32 x rounded to nearest, ties to even, into bfloat16 or float16 out (C-contiguous, "
  "one size, disjoint): the bits a step's round-to-nearest store writes (NaN quieted as it "
  "quiets it, overflow to Inf), on all threads.");
  // A context manager in C++: once __enter__ has returned, `with` runs __exit__ whatever
  // happens (a KeyboardInterrupt between a Python-level increment and its `try` would leave the
  // callback set for good).
  struct BlasOnPool {
    void* setter;
    bool entered = false;
  };
  py::class_<BlasOnPool>(m, "BlasOnPool",
                         "Internal (fastoptim.host): inside `with BlasOnPool(setter):` OpenBLAS's "
                         "threaded jobs run on fastoptim's pool; `setter` is the address of that "
                         "OpenBLAS's (>= 0.3.28) openblas_set_threads_callback_function.  Nested "
                         "blocks count: the callback is unset when the outermost one ends.")
      .def(py::init([](std::uintptr_t setter) {
             if (setter == 0) throw py::value_error("BlasOnPool: setter must not be null");
             return BlasOnPool{reinterpret_cast<void*>(setter)};
           }),
           py::arg("setter"))
      .def("__enter__",
           [](BlasOnPool& b) {
             if (b.entered) throw py::value_error("BlasOnPool: already entered");
             blas_threads_on_pool(b.setter, true);
             b.entered = true;
           })
      .def("__exit__",
           [](BlasOnPool& b, const py::args&) {
             if (b.entered) {
               b.entered = false;
               blas_threads_on_pool(b.setter, false);
             }
             return false;
           })
      .def_static(
          "calls",
          [] {
            const BlasCalls c = blas_calls();
            return py::make_tuple(c.pool, c.threads);
          },
          "(on the pool, on threads of their own): the threaded BLAS calls run through the "
          "callback so far.");
  m.def("stream", [](const py::sequence& arrays) {
    std::vector<float*> ptrs;
    std::vector<Span> spans;
    int64_t n = -1;
    for (std::size_t j = 0; j < static_cast<std::size_t>(py::len(arrays)); ++j) {
      Arg a = check_array(arrays[j], "arrays[" + std::to_string(j) + "]", true);
      if (a.dtype != DType::f32) throw py::type_error("stream: arrays must be float32");
      if (n >= 0 && a.size != n) throw py::value_error("stream: arrays must have equal sizes");
      n = a.size;
      ptrs.push_back(static_cast<float*>(a.data));
      if (a.size) spans.push_back({a.lo, a.hi, "arrays[" + std::to_string(j) + "]"});
    }
    if (ptrs.size() < 2 || ptrs.size() > static_cast<std::size_t>(kMaxState + 2))
      throw py::value_error("stream: need 2 to " + std::to_string(kMaxState + 2) + " arrays");
    sort_and_check_disjoint(spans);
    py::gil_scoped_release release;
    stream(ptrs.data(), static_cast<int>(ptrs.size()), n);
  }, py::arg("arrays"),
  "Roofline kernel: one pass reading every float32 array and writing all but the last "
  "(an optimizer step's traffic).");
}
