"""Backend selection: which implementation runs an op.

Backends (docs/backend-contract.md): `triton` (kernels/, CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), `cuda` and `cpu` (the extension fastattn._C), `torch`
(fastattn/reference.py). `auto` picks, per call, the first backend in the device's preference
order that is available and supports the case; `torch` supports everything, so `auto` never
fails. An explicitly chosen backend never silently hands the work to another: if it cannot run
the case it raises a RuntimeError that says why.
"""

import contextlib
import contextvars
import functools
import importlib
import os

import torch

from . import _ext
from .kernels import _compat as _kernels_compat   # triton-free

_in_triton_op = _kernels_compat._in_triton_op     # set while a fastattn_triton op's body runs

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
ENV_VAR = "FASTATTN_BACKEND"

# Preference of `auto` per device type. On CPU the C++ kernels beat the Triton interpreter by
# orders of magnitude, so the interpreter is only used when asked for by name.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# The kernels module of the triton backend that holds an op: kernels/{op}.py by convention (a
# new op needs no entry here); the exceptions are listed.
TRITON_MODULES = {"rms_norm": "layer_norm", "rotary_qk": "rotary"}

_override = contextvars.ContextVar("fastattn_backend", default=None)
_dispatch_logs = contextvars.ContextVar("fastattn_dispatch_logs", default=())


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fastattn backend {name!r}; valid names: {', '.join(BACKENDS)}")
    return name


def requested_backend():
    """The backend asked for: the innermost use_backend(), else $FASTATTN_BACKEND, else auto.
    Read at every call (a few hundred nanoseconds: it sits on every op's path)."""
    name = _override.get()
    if name is not None:
        return name
    raw = os.environ.get(ENV_VAR)
    return "auto" if raw is None else _env_request(raw)


@functools.lru_cache(maxsize=64)
def _env_request(raw):
    name = raw.strip().lower() or "auto"
    try:
        return _validate(name)
    except ValueError as exc:
        raise ValueError(f"${ENV_VAR}: {exc}") from None


# The innermost use_backend() name as a plain module global, for code torch.compile traces:
# dynamo guards on a global's value in every supported torch, while tracing ContextVar.get()
# is recent (torch 2.6 refuses it). Process-wide, so a thread tracing while another thread is
# inside use_backend() sees that thread's choice (eager calls always read their own context).
_override_for_tracing = None


def use_backend_override():
    """The innermost use_backend() name, or None. Under torch.compile it reads a module
    global that dynamo guards on: a different use_backend() recompiles."""
    if torch.compiler.is_compiling():
        return _override_for_tracing
    return _override.get()


def interpreter_enabled():
    from .kernels._compat import interpreting   # triton-free: importable without a GPU
    return interpreting()


def unavailable_reason(name, device_type=None):
    """Why backend `name` cannot run on `device_type` ('cpu' / 'cuda' / None = anywhere), or None."""
    if name in ("auto", "torch"):
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device_type == "cpu":
            if not interpreter_enabled():
                return "the triton backend runs CPU tensors only with TRITON_INTERPRET=1"
            return None
        import torch
        if not torch.cuda.is_available() and (device_type == "cuda" or not interpreter_enabled()):
            return "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tensors)"
        return None
    if not _ext.extension_loaded():
        return "the extension fastattn._C is not built; " + _ext.BUILD_HINT
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return "the cpu backend runs CPU tensors only"
        if not _ext.cpu_kernels_compiled():
            return "fastattn._C was built without its CPU kernels"
        return None
    if name == "cuda":
        import torch
        if device_type not in (None, "cuda"):
            return "the cuda backend runs CUDA tensors only"
        if not _ext.cuda_kernels_compiled():
            return "fastattn._C was built without CUDA kernels (see build_info())"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    raise AssertionError(name)


def available_backends(device_type=None):
    """Concrete backends that can run here (on `device_type` if given)."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device_type) is None]


@contextlib.contextmanager
def use_backend(name):
    """Run fastattn ops inside the block on backend `name` (auto, triton, cuda, cpu, torch).

    Raises ValueError for an unknown name and RuntimeError when the backend cannot run on this
    machine at all (e.g. `cuda` without a GPU or without CUDA kernels in the build).
    """
    _validate(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastattn backend {name!r} is unavailable: {reason}")
    global _override_for_tracing
    token = _override.set(name)
    outer, _override_for_tracing = _override_for_tracing, name
    try:
        yield
    finally:
        _override.reset(token)
        _override_for_tracing = outer


@functools.lru_cache(maxsize=None)
def backend_module(name, op):
    """The module implementing the contract functions of `op` for backend `name` (cached: it
    is looked up on every eager call)."""
    if name == "triton":
        return importlib.import_module(f"fastattn.kernels.{TRITON_MODULES.get(op, op)}")
    if name in ("cpu", "cuda"):
        return importlib.import_module("fastattn._C_ops")
    return importlib.import_module("fastattn._torch_backend")


def select(op, device_type, *, fallback_to_torch=False, **case):
    """Return the name of the backend that runs `op` on `device_type` tensors.

    The one selector of every op. `case` describes the call for the modules' unsupported()
    checks (dtype, dropout_p, ...). `fallback_to_torch`: an explicitly requested backend that
    cannot run the case gives "torch" instead of an error (for by-products such as
    MultiHeadAttention's weights, which never make a call fail).

    Eager calls read the request (use_backend(), $FASTATTN_BACKEND) at every call and cache the
    decision per (op, device, case, request): availability does not change within a process.
    Under torch.compile the choice is made at trace time and baked into the graph, guarded on
    the use_backend() in force: a compiled function called under another use_backend()
    recompiles (dynamo guards on the value of the context variable read here, in traced code).
    $FASTATTN_BACKEND is read when the function is traced; changing it later does not
    recompile. The dispatch itself is logged by each op's body when it runs (log_dispatch), so
    record_dispatch() sees compiled calls too.
    """
    if torch.compiler.is_compiling():
        case_items = tuple((k, _trace_constant(v)) for k, v in case.items())
        return _select_at_trace_time(op, device_type, case_items, use_backend_override(),
                                     fallback_to_torch)
    return _select_cached(op, device_type, tuple(case.items()), requested_backend(),
                          fallback_to_torch)


def _trace_constant(value):
    """A case value usable as a trace-time constant. A size torch.compile made dynamic (it
    changed between calls) arrives as a SymInt, which assume_constant_result cannot take: it is
    specialised (a guard; another value recompiles). So the callers put in the case only sizes
    a backend decides on (head dims, which do not change within a model) and booleans about
    the rest (linear's `rows` <= limit); sequence lengths and row lengths stay out, so that
    they stay dynamic."""
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, torch.SymBool):
        return bool(value)
    if isinstance(value, torch.SymFloat):
        return float(value)
    return value


def _select(op, device_type, case_items, override=None, fallback_to_torch=False):
    """`override`: the use_backend() name (None: $FASTATTN_BACKEND or auto). An argument so that
    under torch.compile the constant result is a function of it."""
    case = dict(case_items)
    requested = requested_backend() if override is None else override
    candidates = AUTO_ORDER.get(device_type, ("torch",)) if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        reason = unavailable_reason(name, device_type)
        if reason is None:
            reason = backend_module(name, op).unsupported(op, **case)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    if fallback_to_torch:
        return "torch"
    raise RuntimeError(f"fastattn backend {requested!r} cannot run {op} on {device_type} "
                       f"tensors ({'; '.join(reasons)}); use backend 'auto' to fall back to torch")


# Exceptions are not cached, so a refused request raises on every call.
_select_cached = functools.lru_cache(maxsize=4096)(_select)
_select_at_trace_time = torch.compiler.assume_constant_result(_select)


# Backends whose implementations are dispatcher ops (fastattn._C) or torch ops: safe to call
# without the custom-op wrapper. Triton launches need real tensors, so it always goes through it.
_DIRECT_BACKENDS = ("cpu", "cuda", "torch")


def eager_call(op, impl, backend, *args):
    """op(*args), or impl(*args) (the op's own implementation) when nothing needs the custom op:
    an eager call (not traced by torch.compile) on plain tensors none of which needs a
    gradient, on a backend in _DIRECT_BACKENDS. The custom-op dispatch costs ~13 us a call,
    more than some of the kernels behind it at small sizes.

    Traced by torch.compile on the triton backend, it calls the op's `triton_twin` instead
    (fastattn/ops/_triton.py), where the op has one: the graph then holds the Triton kernels
    themselves, not an opaque op. This is the one place that makes that choice."""
    if torch.compiler.is_compiling():
        if backend == "triton":
            op = getattr(op, "triton_twin", op)
        return op(*args)
    if backend in _DIRECT_BACKENDS:
        grad = torch.is_grad_enabled()
        for a in args:
            if isinstance(a, torch.Tensor) and (
                    (type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter)
                    or (grad and a.requires_grad)):
                break
        else:
            return impl(*args)
    return op(*args)


def log_dispatch(op, backend):
    """Record that `op` runs on `backend` in every active record_dispatch() block. Called by the
    body of each forward op (fastattn/ops/*.py) as it runs: eagerly, through the custom op, and
    from torch.compile'd graphs (custom ops are opaque to the compiler; their bodies run at
    run time, not while tracing). The body of a fastattn_triton op (fastattn/ops/_triton.py) is
    traced into the graph instead: there the entry is made by an effectful op in the graph,
    torch.ops.fastattn_triton.log_dispatch, so it too is logged each time the graph runs."""
    if _in_triton_op.get() and _kernels_compat.tracing_triton_op():   # the flag: ~40 ns
        torch.ops.fastattn_triton.log_dispatch(op, backend)
        return
    for log in _dispatch_logs.get():
        log.append((op, backend))


def append_dispatch(op, backend):
    """Append (op, backend) to every active record_dispatch() log."""
    for log in _dispatch_logs.get():
        log.append((op, backend))


@contextlib.contextmanager
def record_dispatch():
    """Collect (op, backend) for every fastattn forward kernel call inside the block, eager or
    compiled (backward calls are not logged).

    >>> with fastattn.record_dispatch() as calls:
    ...     out = fastattn.scaled_dot_product_attention(q, k, v)
    >>> calls  # [('attention', 'cpu')]
    """
    log = []
    token = _dispatch_logs.set(_dispatch_logs.get() + (log,))
    try:
        yield log
    finally:
        _dispatch_logs.reset(token)
