// The eager fast path: fastattn.softmax / layer_norm / rms_norm / scaled_dot_product_attention /
// apply_rotary / apply_rotary_qk / kvcache_attention / swiglu / linear called from Python on plain CPU
// tensors that need no gradient, outside torch.compile, on the `cpu` backend (requested or chosen by `auto`), call the registered kernel op
// (torch.ops.fastattn_kernels.*) straight from C++.
//
// Why: at decode and other tiny sizes the Python layers above a kernel (argument parsing, the
// backend selector, the custom-op and torch.ops wrappers) cost several times the kernel itself
// (benchmarks/cases/overhead.py; issue #13's bar is within 1.5x of PyTorch's own call). Each
// function here returns None unless the call is the plain case it accepts, fully valid; the
// public Python function then takes its general path (validation with clear errors, the
// selector, the custom op), which stays the only path under torch.compile, autograd, tensor
// subclasses, dispatch modes, autocast and every other backend. The kernel op called is the one
// the general path's `cpu` backend calls, through the C++ dispatcher, so both paths run the
// same code for the same arguments.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "eager.h"

namespace fastattn {
namespace {

using OptTensor = std::optional<at::Tensor>;

// fastattn._backend's context variables, handed over by fastattn/_eager.py at import.
PyObject* g_backend_override = nullptr;  // use_backend(): None or a backend name
PyObject* g_dispatch_logs = nullptr;     // record_dispatch(): a tuple of lists

// ------------------------------------------------------------------------ the plain case

// A torch.Tensor (or Parameter), of any dtype, with no __torch_function__ override and no
// torch-function mode, dense on the CPU, that dispatches straight to the CPU kernel: no dispatch key above the
// backend once autograd is out of the picture (no Python/functorch/functionalization wrappers,
// no conjugate/negative views, no autocast, tracing or dispatch mode in the thread-local
// include set), and no gradient to record.
const at::Tensor* plain_cpu_tensor_any(PyObject* obj) {
  // Exactly torch.Tensor or Parameter: a subclass may override __torch_function__.
  if (!THPVariable_CheckExact(obj) || at::impl::torch_function_mode_enabled()) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided) return nullptr;
  if (t.requires_grad() && at::GradMode::is_enabled()) return nullptr;
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  const c10::DispatchKeySet keys =
      ((t.key_set() | tls.included_) - tls.excluded_) -
      c10::autograd_dispatch_keyset_with_ADInplaceOrView -
      c10::DispatchKeySet(c10::DispatchKey::BackendSelect);  // always included; factories only
  if (keys.highestPriorityTypeId() != c10::DispatchKey::CPU) return nullptr;
  return &t;
}

// plain_cpu_tensor_any of a floating dtype the kernels take (fp32, fp16, bf16).
const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  const at::Tensor* t = plain_cpu_tensor_any(obj);
  if (t == nullptr) return nullptr;
  const auto dtype = t->scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return nullptr;
  return t;
}

// $FASTATTN_BACKEND as fastattn._backend reads it: stripped, lower case.
std::string normalised_env(const char* raw) {
  std::string s(raw);
  const auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!s.empty() && space(s.back())) s.pop_back();
  size_t lead = 0;
  while (lead < s.size() && space(s[lead])) ++lead;
  s.erase(0, lead);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Whether the backend in force for this call is `cpu` or `auto` (which picks `cpu` first for
// CPU tensors): use_backend() in this context, else $FASTATTN_BACKEND, as
// fastattn._backend.requested_backend() reads them. Anything else, or an invalid name (whose
// error the general path raises), is not the fast path's.
bool cpu_backend_requested() {
  if (g_backend_override == nullptr) return false;
  PyObject* name = nullptr;
  if (PyContextVar_Get(g_backend_override, Py_None, &name) < 0) {
    PyErr_Clear();
    return false;
  }
  bool ok;
  if (name == Py_None) {
    const char* raw = std::getenv("FASTATTN_BACKEND");  // os.environ writes through to it
    const std::string env = raw == nullptr ? std::string() : normalised_env(raw);
    ok = env.empty() || env == "auto" || env == "cpu";
  } else {
    ok = PyUnicode_Check(name) && (PyUnicode_CompareWithASCIIString(name, "auto") == 0 ||
                                   PyUnicode_CompareWithASCIIString(name, "cpu") == 0);
  }
  Py_DECREF(name);
  return ok;
}

// record_dispatch(): append (op, "cpu") to every active log, as the general path's op bodies
// do (fastattn._backend.log_dispatch). Returns false on a Python error.
bool log_dispatch(const char* op) {
  if (g_dispatch_logs == nullptr) return true;
  PyObject* logs = nullptr;
  if (PyContextVar_Get(g_dispatch_logs, nullptr, &logs) < 0) return false;
  if (logs == nullptr) return true;
  bool ok = true;
  if (PyTuple_Check(logs) && PyTuple_GET_SIZE(logs) > 0) {
    PyObject* entry = Py_BuildValue("(ss)", op, "cpu");
    ok = entry != nullptr;
    for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(logs); ++i)
      ok = PyList_Append(PyTuple_GET_ITEM(logs, i), entry) == 0;
    Py_XDECREF(entry);
  }
  Py_DECREF(logs);
  return ok;
}

bool is_int(PyObject* o) { return PyLong_Check(o) && !PyBool_Check(o); }

// A finite Python float or int (not bool), as the general path's float(...) accepts them.
bool as_finite_double(PyObject* o, double& out) {
  if (PyFloat_Check(o)) {
    out = PyFloat_AS_DOUBLE(o);
  } else if (is_int(o)) {
    out = PyLong_AsDouble(o);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return std::isfinite(out);
}

bool is_zero_number(PyObject* o) {
  double v;
  return as_finite_double(o, v) && v == 0.0;
}

// The kernel ops, looked up once. The same registrations the `cpu` backend
// (fastattn/_C_ops.py) calls through torch.ops.fastattn_kernels.
const auto& softmax_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::softmax_forward", "")
          .typed<at::Tensor(const at::Tensor&, double, const OptTensor&, bool)>();
  return op;
}

const auto& rms_norm_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::rms_norm_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptTensor&, double, const OptTensor&)>();
  return op;
}

const auto& layer_norm_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::layer_norm_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const OptTensor&, const OptTensor&, double, const OptTensor&)>();
  return op;
}

const auto& attention_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double,
              bool, bool, int64_t, int64_t, double, const OptTensor&, double, int64_t,
              int64_t, const OptTensor&)>();
  return op;
}

// Other threads run Python while a kernel runs, as they do around torch's own ops.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// The call's result as a new reference, or None (not the fast path's case).
PyObject* decline() { Py_RETURN_NONE; }

PyObject* wrap_result(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

PyObject* wrap_result(std::pair<at::Tensor, at::Tensor> both) {  // a tuple of two
  PyObject* first = THPVariable_Wrap(std::move(both.first));
  if (first == nullptr) return nullptr;
  PyObject* second = THPVariable_Wrap(std::move(both.second));
  if (second == nullptr) {
    Py_DECREF(first);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, first, second);
  Py_DECREF(first);
  Py_DECREF(second);
  return pair;
}

// The accepted call: logs it for record_dispatch(), runs `compute` (-> at::Tensor, or a pair of
// them, returned as a tuple) without the GIL and below autograd (nothing needs a gradient), and
// returns its result to Python.
template <typename Compute>
PyObject* run_kernel(const char* op, Compute&& compute) {
  if (!log_dispatch(op)) return nullptr;
  decltype(compute()) result;
  {
    ReleaseGil no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = compute();
  }
  return wrap_result(std::move(result));
}

// ------------------------------------------------------------------------------- softmax

// softmax(x, dim, scale, causal): fastattn.softmax without a mask.
PyObject* eager_softmax(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !cpu_backend_requested()) return decline();
  const at::Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() == 0 || x->numel() == 0 || x->stride(-1) != 1) return decline();
  if (!is_int(args[1])) return decline();
  const long long dim = PyLong_AsLongLong(args[1]);
  if (dim != -1 && dim != x->dim() - 1) return decline();  // softmax over the last dim only
  double scale = 1.0;
  if (args[2] != Py_None && !as_finite_double(args[2], scale)) return decline();
  const int causal = PyObject_IsTrue(args[3]);
  if (causal < 0) return nullptr;
  if (causal && x->dim() < 2) return decline();
  return run_kernel("softmax", [&] {
    return softmax_kernel().call(*x, scale, std::nullopt, causal != 0);
  });
  END_HANDLE_TH_ERRORS
}

// ------------------------------------------------------------------------------ rms_norm

bool machine_eps(at::ScalarType dtype, double& eps) {  // torch.finfo(dtype).eps
  switch (dtype) {
    case at::kFloat: eps = std::ldexp(1.0, -23); return true;
    case at::kHalf: eps = std::ldexp(1.0, -10); return true;
    case at::kBFloat16: eps = std::ldexp(1.0, -7); return true;
    default: return false;
  }
}

// The normalized shape given as an int or a sequence of ints, if it equals x's trailing dims.
bool trailing_dims_match(PyObject* shape, const at::Tensor& x, int64_t& n_dims) {
  if (is_int(shape)) {
    n_dims = 1;
    return x.dim() >= 1 && PyLong_AsLongLong(shape) == x.size(-1);
  }
  if (!PyTuple_Check(shape) && !PyList_Check(shape)) return false;
  PyObject* seq = shape;  // a tuple (torch.Size included) or a list
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n == 0 || n > x.dim()) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    if (!is_int(item) || PyLong_AsLongLong(item) != x.size(x.dim() - n + i)) return false;
  }
  n_dims = n;
  return true;
}

// x's normalised dims (the trailing ones `shape` names) flattened: x as (rows, cols) and each
// per-feature tensor (weight, bias; None allowed) as (cols,). False when not the plain case.
bool norm_operands(PyObject* input, PyObject* shape, std::initializer_list<PyObject*> features,
                   const at::Tensor*& x, int64_t& cols, std::vector<OptTensor>& flat) {
  x = plain_cpu_tensor(input);
  if (x == nullptr || x->numel() == 0) return false;
  int64_t n_dims = 0;
  if (!trailing_dims_match(shape, *x, n_dims)) {
    if (PyErr_Occurred()) PyErr_Clear();
    return false;
  }
  cols = 1;
  for (int64_t d = x->dim() - n_dims; d < x->dim(); ++d) cols *= x->size(d);
  for (PyObject* obj : features) {
    if (obj == Py_None) {
      flat.emplace_back();
      continue;
    }
    const at::Tensor* t = plain_cpu_tensor(obj);
    if (t == nullptr || t->dim() != n_dims) return false;
    for (int64_t d = 0; d < n_dims; ++d)
      if (t->size(d) != x->size(x->dim() - n_dims + d)) return false;
    flat.emplace_back(t->reshape({cols}));
  }
  return true;
}

// rms_norm(input, normalized_shape, weight, eps): fastattn.rms_norm without a residual.
PyObject* eager_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !cpu_backend_requested()) return decline();
  const at::Tensor* x = nullptr;
  int64_t cols = 0;
  std::vector<OptTensor> flat;
  if (!norm_operands(args[0], args[1], {args[2]}, x, cols, flat)) return decline();
  double eps;
  if (args[3] == Py_None) {
    if (!machine_eps(x->scalar_type(), eps)) return decline();
  } else if (!as_finite_double(args[3], eps)) {
    return decline();
  }
  return run_kernel("rms_norm", [&] {
    const at::Tensor rows = x->reshape({x->numel() / cols, cols}).contiguous();
    return std::get<0>(rms_norm_kernel().call(rows, flat[0], eps, std::nullopt)).view(x->sizes());
  });
  END_HANDLE_TH_ERRORS
}

// layer_norm(input, normalized_shape, weight, bias, eps): fastattn.layer_norm without a
// residual.
PyObject* eager_layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !cpu_backend_requested()) return decline();
  const at::Tensor* x = nullptr;
  int64_t cols = 0;
  std::vector<OptTensor> flat;
  if (!norm_operands(args[0], args[1], {args[2], args[3]}, x, cols, flat)) return decline();
  double eps;
  if (!as_finite_double(args[4], eps)) return decline();
  return run_kernel("layer_norm", [&] {
    const at::Tensor rows = x->reshape({x->numel() / cols, cols}).contiguous();
    return std::get<0>(layer_norm_kernel().call(rows, flat[0], flat[1], eps, std::nullopt))
        .view(x->sizes());
  });
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------------------- attention

// attention(q, k, v, dropout_p, is_causal, scale, enable_gqa): fastattn.scaled_dot_product_
// attention on batched (B, H, S, D) tensors without a mask, window, softcap, key_lengths or lse.
PyObject* eager_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !cpu_backend_requested()) return decline();
  const at::Tensor* q = plain_cpu_tensor(args[0]);
  const at::Tensor* k = plain_cpu_tensor(args[1]);
  const at::Tensor* v = plain_cpu_tensor(args[2]);
  if (q == nullptr || k == nullptr || v == nullptr) return decline();
  if (q->dim() != 4 || k->dim() != 4 || v->dim() != 4) return decline();
  if (k->scalar_type() != q->scalar_type() || v->scalar_type() != q->scalar_type())
    return decline();
  const int64_t b = q->size(0), h = q->size(1), d = q->size(3);
  const int64_t hkv = k->size(1), sk = k->size(2);
  if (k->size(0) != b || v->size(0) != b || k->size(3) != d || v->size(1) != hkv ||
      v->size(2) != sk || v->size(3) != d || d == 0)
    return decline();  // mismatches raise on the general path; Dv != D runs on `torch`
  const int gqa = PyObject_IsTrue(args[6]);
  if (gqa < 0) return nullptr;
  if (h != hkv && !(gqa && hkv > 0 && h % hkv == 0)) return decline();
  if (!is_zero_number(args[3])) return decline();  // dropout
  const int causal = PyObject_IsTrue(args[4]);
  if (causal < 0) return nullptr;
  double scale = 1.0 / std::sqrt(static_cast<double>(d));
  if (args[5] != Py_None && !as_finite_double(args[5], scale)) return decline();
  return run_kernel("attention", [&] {
    return std::get<0>(attention_kernel().call(*q, *k, *v, std::nullopt, scale, causal != 0,
                                               /*bottom_right=*/false, -1, -1, 0.0,
                                               std::nullopt, 0.0, 0, 0,
                                               /*alibi_slopes=*/std::nullopt))
        .contiguous();
  });
  END_HANDLE_TH_ERRORS
}

// -------------------------------------------------------------------------------- rotary

const auto& rotary_out_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::rotary_forward_out", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                      const OptTensor&, bool, const at::Tensor&, const OptTensor&)>();
  return op;
}

// The sequence dim of a 4-D tensor as fastattn.apply_rotary reads seq_dim: 1 or 2 (batch
// first, the head dim last), or -1 when it is not the plain case.
int64_t rotary_seq_dim(PyObject* seq_dim) {
  if (!is_int(seq_dim)) return -1;
  const long long s = PyLong_AsLongLong(seq_dim);
  if (s == 1 || s == -3) return 1;
  if (s == 2 || s == -2) return 2;
  return -1;
}

// positions for a (B, S) rotation: None, or an int32/int64 (B, S) or (1, S) tensor whose
// values index the cos/sin cache (out-of-range values are the general path's error).
// False when not the plain case; `out` is then unset.
bool rotary_positions(PyObject* obj, int64_t b, int64_t s, int64_t cache_rows,
                      OptTensor& out) {
  if (obj == Py_None) return s <= cache_rows;
  const at::Tensor* t = plain_cpu_tensor_any(obj);
  if (t == nullptr || (t->scalar_type() != at::kInt && t->scalar_type() != at::kLong) ||
      t->dim() != 2 || t->size(1) != s || (t->size(0) != b && t->size(0) != 1))
    return false;
  const at::Tensor pos = t->to(at::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); ++i)
    if (p[i] < 0 || p[i] >= cache_rows) return false;
  out = pos.expand({b, s});
  return true;
}

// x (4-D, sequence at `seq`) rotated into a new tensor laid out like x, as
// fastattn.apply_rotary's general path does (the kernel op writes into empty_like of the
// (B, S, H, D) view, then the view is undone).
at::Tensor rotate_4d(const at::Tensor& x, int64_t seq, const at::Tensor& cos,
                     const at::Tensor& sin, bool interleaved, const OptTensor& positions) {
  const at::Tensor x4 = x.movedim(seq, 1);
  at::Tensor out = at::empty_like(x4);
  rotary_out_kernel().call(x4, cos, sin, interleaved, std::nullopt, false, out, positions);
  return out.movedim(1, seq);
}

// The arguments after the tensor(s) of a rotary call, (cos, sin, interleaved, seq_dim,
// positions), for a 4-D x: cos/sin 2-D of one shape rotating 0 < 2 * cols <= head_dim,
// the sequence dim, and positions for x's (B, S). 1: the plain case; 0: not (decline);
// -1: a Python error.
struct RotaryArgs {
  const at::Tensor* cos = nullptr;
  const at::Tensor* sin = nullptr;
  bool interleaved = false;
  int64_t seq = -1;
  OptTensor positions;
};

int rotary_args(const at::Tensor& x, PyObject* const* rest, RotaryArgs& a) {
  a.cos = plain_cpu_tensor(rest[0]);
  a.sin = plain_cpu_tensor(rest[1]);
  if (a.cos == nullptr || a.sin == nullptr || a.cos->dim() != 2 ||
      a.cos->sizes() != a.sin->sizes() || a.cos->size(1) == 0 ||
      2 * a.cos->size(1) > x.size(3))
    return 0;
  const int interleaved = PyObject_IsTrue(rest[2]);
  if (interleaved < 0) return -1;
  a.interleaved = interleaved != 0;
  a.seq = rotary_seq_dim(rest[3]);
  if (a.seq < 0) return 0;
  return rotary_positions(rest[4], x.size(0), x.size(a.seq), a.cos->size(0), a.positions) ? 1
                                                                                           : 0;
}

// rotary_qk(q, k, cos, sin, interleaved, seq_dim, positions): fastattn.apply_rotary_qk on 4-D
// q and k without offsets. Returns (q_rotated, k_rotated).
PyObject* eager_rotary_qk(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !cpu_backend_requested()) return decline();
  const at::Tensor* q = plain_cpu_tensor(args[0]);
  const at::Tensor* k = plain_cpu_tensor(args[1]);
  if (q == nullptr || k == nullptr || q->dim() != 4 || k->dim() != 4) return decline();
  if (k->scalar_type() != q->scalar_type()) return decline();
  RotaryArgs a;
  const int ok = rotary_args(*q, args + 2, a);
  if (ok <= 0) return ok < 0 ? nullptr : decline();
  if (k->size(0) != q->size(0) || k->size(a.seq) != q->size(a.seq) || k->size(3) != q->size(3))
    return decline();
  return run_kernel("rotary", [&] {
    return std::make_pair(rotate_4d(*q, a.seq, *a.cos, *a.sin, a.interleaved, a.positions),
                          rotate_4d(*k, a.seq, *a.cos, *a.sin, a.interleaved, a.positions));
  });
  END_HANDLE_TH_ERRORS
}

// rotary(x, cos, sin, interleaved, seq_dim, positions): fastattn.apply_rotary on a 4-D x
// without offsets, not in place.
PyObject* eager_rotary(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !cpu_backend_requested()) return decline();
  const at::Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() != 4) return decline();
  RotaryArgs a;
  const int ok = rotary_args(*x, args + 1, a);
  if (ok <= 0) return ok < 0 ? nullptr : decline();
  return run_kernel("rotary", [&] {
    return rotate_4d(*x, a.seq, *a.cos, *a.sin, a.interleaved, a.positions);
  });
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------- kvcache attention

const auto& kvcache_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::kvcache_attention_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const OptTensor&, const OptTensor&, int64_t, double, bool, int64_t, int64_t,
              double, const OptTensor&)>();
  return op;
}

// kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale, is_causal, softcap):
// fastattn.kvcache_attention over a contiguous-layout cache (any strides) that it does not
// append to: no k/v, block_table, cache_batch_idx, rotary, window, alibi or lse (the Python
// caller passes only such calls). cache_seqlens: an int, or an int32 (B,) tensor.
PyObject* eager_kvcache_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !cpu_backend_requested()) return decline();
  const at::Tensor* q = plain_cpu_tensor(args[0]);
  const at::Tensor* kc = plain_cpu_tensor(args[1]);
  const at::Tensor* vc = plain_cpu_tensor(args[2]);
  if (q == nullptr || kc == nullptr || vc == nullptr) return decline();
  if (q->dim() != 4 || kc->dim() != 4 || kc->sizes() != vc->sizes()) return decline();
  if (kc->scalar_type() != q->scalar_type() || vc->scalar_type() != q->scalar_type())
    return decline();
  const int64_t b = q->size(0), h = q->size(2), d = q->size(3);
  const int64_t s_max = kc->size(1), hkv = kc->size(2);
  if (kc->size(0) != b || kc->size(3) != d || hkv == 0 || h % hkv != 0 || d == 0)
    return decline();
  at::Tensor seqlens;
  if (is_int(args[3])) {
    const long long n = PyLong_AsLongLong(args[3]);
    if (n == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return decline();
    }
    if (n < 0 || n > s_max) return decline();
    seqlens = at::full({b}, static_cast<int64_t>(n), at::TensorOptions().dtype(at::kInt));
  } else {
    const at::Tensor* t = plain_cpu_tensor_any(args[3]);
    if (t == nullptr || t->scalar_type() != at::kInt || t->dim() != 1 || t->size(0) != b)
      return decline();
    seqlens = t->contiguous();
    const int32_t* lens = seqlens.data_ptr<int32_t>();
    for (int64_t i = 0; i < b; ++i)
      if (lens[i] < 0 || lens[i] > s_max) return decline();
  }
  double scale = 1.0 / std::sqrt(static_cast<double>(d));
  if (args[4] != Py_None && !as_finite_double(args[4], scale)) return decline();
  const int causal = PyObject_IsTrue(args[5]);
  if (causal < 0) return nullptr;
  double softcap = 0.0;
  if (!as_finite_double(args[6], softcap) || softcap < 0) return decline();
  return run_kernel("kvcache_attention", [&] {
    return std::get<0>(kvcache_kernel().call(*q, *kc, *vc, seqlens, std::nullopt, std::nullopt,
                                             /*seqlen_new=*/0, scale, causal != 0, -1, -1,
                                             softcap, /*alibi_slopes=*/std::nullopt))
        .contiguous();
  });
  END_HANDLE_TH_ERRORS
}

// -------------------------------------------------------------------------------- swiglu

const auto& swiglu_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::swiglu_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op;
}

// swiglu(gate, up): fastattn.swiglu on tensors of one shape and dtype.
PyObject* eager_swiglu(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !cpu_backend_requested()) return decline();
  const at::Tensor* gate = plain_cpu_tensor(args[0]);
  const at::Tensor* up = plain_cpu_tensor(args[1]);
  if (gate == nullptr || up == nullptr || up->sizes() != gate->sizes() ||
      up->scalar_type() != gate->scalar_type())
    return decline();
  return run_kernel("swiglu", [&] {
    return swiglu_kernel().call(gate->contiguous(), up->contiguous());
  });
  END_HANDLE_TH_ERRORS
}

// -------------------------------------------------------------------------------- linear

const auto& linear_kernel() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastattn_kernels::linear_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  return op;
}

// The most rows `auto` gives the cpu backend's linear kernel, per dtype: fastattn/_C_ops.py's
// LINEAR_MAX_ROWS (tests/test_eager_fast_path.py checks that both paths agree at the edges).
int64_t linear_max_rows(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return 16;
    case at::kHalf: return 8;
    case at::kBFloat16: return 4;
    default: return 0;
  }
}

// linear(input, weight, bias): fastattn.linear with 1..linear_max_rows rows and a nonempty
// in_features.
PyObject* eager_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !cpu_backend_requested()) return decline();
  const at::Tensor* x = plain_cpu_tensor(args[0]);
  const at::Tensor* w = plain_cpu_tensor(args[1]);
  if (x == nullptr || w == nullptr || x->dim() == 0 || w->dim() != 2) return decline();
  const int64_t k = x->size(-1);
  if (k == 0 || w->size(1) != k || w->scalar_type() != x->scalar_type()) return decline();
  const int64_t rows = x->numel() / k;
  if (rows < 1 || rows > linear_max_rows(x->scalar_type())) return decline();
  OptTensor bias;
  if (args[2] != Py_None) {
    const at::Tensor* b = plain_cpu_tensor(args[2]);
    if (b == nullptr || b->dim() != 1 || b->size(0) != w->size(0) ||
        b->scalar_type() != x->scalar_type())
      return decline();
    bias = *b;
  }
  std::vector<int64_t> shape(x->sizes().begin(), x->sizes().end());
  shape.back() = w->size(0);
  return run_kernel("linear", [&] {
    return linear_kernel().call(x->reshape({rows, k}), *w, bias).view(shape);
  });
  END_HANDLE_TH_ERRORS
}

// init(backend_override, dispatch_logs): fastattn._backend's context variables.
PyObject* eager_init(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyContextVar_CheckExact(args[0]) || !PyContextVar_CheckExact(args[1])) {
    PyErr_SetString(PyExc_TypeError, "_eager_init(backend_override, dispatch_logs) takes two "
                                     "contextvars.ContextVar");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_INCREF(args[1]);
  Py_XSETREF(g_backend_override, args[0]);
  Py_XSETREF(g_dispatch_logs, args[1]);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_eager_init", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_init)),
     METH_FASTCALL, "Hand fastattn._backend's context variables to the eager fast path."},
    {"_eager_softmax",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_softmax)), METH_FASTCALL,
     "softmax(x, dim, scale, causal) -> Tensor, or None when not the fast path's case."},
    {"_eager_rms_norm",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_rms_norm)), METH_FASTCALL,
     "rms_norm(input, normalized_shape, weight, eps) -> Tensor, or None."},
    {"_eager_layer_norm",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_layer_norm)),
     METH_FASTCALL, "layer_norm(input, normalized_shape, weight, bias, eps) -> Tensor, or None."},
    {"_eager_attention",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_attention)),
     METH_FASTCALL,
     "attention(q, k, v, dropout_p, is_causal, scale, enable_gqa) -> Tensor, or None."},
    {"_eager_rotary_qk",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_rotary_qk)),
     METH_FASTCALL,
     "rotary_qk(q, k, cos, sin, interleaved, seq_dim, positions) -> (q, k), or None."},
    {"_eager_rotary", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_rotary)),
     METH_FASTCALL, "rotary(x, cos, sin, interleaved, seq_dim, positions) -> Tensor, or None."},
    {"_eager_kvcache_attention",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_kvcache_attention)),
     METH_FASTCALL,
     "kvcache_attention(q, k_cache, v_cache, cache_seqlens, scale, is_causal, softcap) -> "
     "Tensor, or None."},
    {"_eager_swiglu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_swiglu)),
     METH_FASTCALL, "swiglu(gate, up) -> Tensor, or None."},
    {"_eager_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(eager_linear)),
     METH_FASTCALL, "linear(input, weight, bias) -> Tensor, or None."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* eager_methods() { return methods; }

}  // namespace fastattn
