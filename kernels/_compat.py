"""What differs between the Triton releases fastattn supports (triton >= 3.2), in one place.

- `autotune`: triton.autotune whose Autotuner is built on the first launch. Triton 3.2's
  Autotuner asks the active GPU driver for its benchmarker in __init__, so building it at
  import fails on a machine without a GPU (and without TRITON_INTERPRET=1).
- `ast_source`: triton.compiler.ASTSource for the GPU static report. From 3.3 on it takes the
  signature with "constexpr" entries and the constexprs by name; 3.2 takes the signature of the
  runtime arguments only and the constants by name under another keyword.
- `INTERPRETER_HOOKS`: the interpreter internals the test harness patches (tests/conftest.py:
  bf16 dot and fp32->bf16 rounding); `missing_interpreter_hooks()` says which of them this
  Triton lacks, so a release that renames one fails a test instead of silently going unpatched.
- `interpreting()`: whether Triton runs under its interpreter (TRITON_INTERPRET=1, read on each
  call). The one place that reads the variable; this module imports triton only inside the
  functions that need it, so fastattn/_backend.py and the tests can ask without triton or a GPU.
- `launch(kernel)`: what a launcher indexes with its grid, `launch(k)[grid](...)`. The kernel
  itself, except while torch.compile traces the body of a `fastattn_triton` op
  (fastattn/ops/_triton.py): then torch.library.wrap_triton(kernel), so the launch becomes a
  triton_kernel_wrapper node of the graph. Under the interpreter `@triton.jit` gives an
  InterpretedFunction, which wrap_triton refuses (torch 2.6) or passes through untraced (later
  torch); the launch is then traced through a JITFunction twin that runs on the interpreter.
"""

import contextlib
import contextvars
import functools
import inspect
import os


def interpreting():
    """True when TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_version():
    """(major, minor) of the installed Triton."""
    import triton

    parts = triton.__version__.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


class _LazyAutotuner:
    """Stands in for triton.autotune(**kwargs)(fn) until the first `tuned[grid](...)`."""

    def __init__(self, fn, kwargs):
        self.fn = fn
        self.kwargs = kwargs
        self._tuner = None

    @property
    def tuner(self):
        if self._tuner is None:
            import triton

            self._tuner = triton.autotune(**self.kwargs)(self.fn)
        return self._tuner

    def __getitem__(self, grid):
        return self.tuner[grid]


def autotune(**kwargs):
    """Decorator with triton.autotune's arguments; the Autotuner is built on first launch."""
    return lambda fn: _LazyAutotuner(fn, kwargs)


def ast_source(fn, signature, constexprs):
    """ASTSource(fn, ...) for `signature` (arg name -> type, "constexpr" for the constexprs)
    and `constexprs` (arg name -> value), on every supported Triton."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:                      # triton >= 3.3
        return ASTSource(fn, dict(signature), dict(constexprs))
    runtime = {k: v for k, v in signature.items() if v != "constexpr"}
    return ASTSource(fn, runtime, dict(constexprs))  # triton 3.2: constants=


# name in triton.runtime.interpreter -> the leading parameters tests/conftest.py calls it with
INTERPRETER_HOOKS = {
    "InterpreterBuilder.create_dot": ("self", "a", "b", "d", "input_precision",
                                      "max_num_imprecise_acc"),
    "InterpreterBuilder.cast_impl": ("self", "src", "dst_type"),
    "_convert_float": ("input", "input_dtype", "output_dtype", "rounding_mode"),
    "TensorHandle": ("data", "dtype"),
}


def missing_interpreter_hooks():
    """The INTERPRETER_HOOKS entries this Triton lacks or calls differently (empty: all fine)."""
    from triton.runtime import interpreter

    missing = []
    for name, params in INTERPRETER_HOOKS.items():
        obj = interpreter
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"{name} (absent)")
        else:
            have = tuple(inspect.signature(obj).parameters)
            if have[:len(params)] != params:
                missing.append(f"{name}{have} does not start with {params}")
    return missing


# ------------------------------------------------------------ launches torch.compile can trace

_in_triton_op = contextvars.ContextVar("fastattn_in_triton_op", default=False)

# launch options a traced interpreted launch drops: the interpreter ignores them, and torch
# wraps a kernel given one into a one-config Autotuner, which Triton 3.2 builds only with a GPU
_GPU_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@contextlib.contextmanager
def triton_op_body():
    """Marks the body of a fastattn_triton op (fastattn/ops/_triton.py) while it runs."""
    token = _in_triton_op.set(True)
    try:
        yield
    finally:
        _in_triton_op.reset(token)


def tracing_triton_op():
    """True while torch.compile traces a fastattn_triton op's body into Triton kernel nodes.
    torch.library.triton_op runs the body with wrap_triton disabled when it is called eagerly
    (or under FakeTensorMode only), so only tracing sees both flags."""
    if not _in_triton_op.get():
        return False
    from torch._library.triton import is_wrap_triton_enabled   # torch >= 2.6
    return is_wrap_triton_enabled()


def traced_inputs(args, keep=()):
    """The arguments a fastattn_triton op's body works on: `args` itself, except while it is
    traced under the interpreter. There torch cannot tell which tensors a kernel writes (it
    lowers the kernel for the active GPU to find out, and there is none), so it assumes every
    tensor argument is written and would write the op's inputs back, which fails for an
    expanded input (a broadcast mask). The body then works on copies of its tensor inputs;
    the kernels only ever write tensors the launchers allocate. Positions in `keep` (the
    arguments the op declares it mutates: kvcache_attention's caches) are passed as they are,
    so the body's writes reach them."""
    if not (interpreting() and tracing_triton_op()):
        return args
    import torch
    return tuple(a.clone() if isinstance(a, torch.Tensor) and i not in keep else a
                 for i, a in enumerate(args))


def launch(kernel):
    """`launch(kernel)[grid](*args, **kwargs)` launches `kernel` (a @triton.jit function, an
    Autotuner or an `autotune` stand-in); see the module docstring.

    Launcher rule (for the interpreter's traced launches, _InterpretedLaunch): a tensor passed
    as a placeholder for a pointer the kernel does not use is passed after the argument it
    repeats, never before a pointer the kernel writes through."""
    if not tracing_triton_op():
        return kernel
    if isinstance(kernel, _LazyAutotuner):
        kernel = kernel.tuner
    from torch.library import wrap_triton
    if not interpreting():
        return wrap_triton(kernel)
    return _InterpretedLaunch(wrap_triton(_traceable_twin(kernel)))


class _InterpretedLaunch:
    """wrap_triton(twin)[grid](...) without the GPU-only launch options, and with a copy for a
    tensor passed twice. Traced under the interpreter, torch takes every tensor argument as
    written (see traced_inputs) and writes each one back to its tensor, so a second argument
    that is the first one's tensor (a launcher's placeholder for a pointer the kernel never
    uses: softmax's absent mask, the norms' absent residual, h, bias and RMSNorm's mean,
    rotary's absent k) would overwrite the kernel's output with its own unwritten copy."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __getitem__(self, grid):
        launcher = self.wrapped[grid]

        def run(*args, **kwargs):
            for name in _GPU_LAUNCH_OPTIONS:
                kwargs.pop(name, None)
            seen = set()

            def once(a):
                if not hasattr(a, "data_ptr"):          # not a tensor
                    return a
                if id(a) in seen:
                    return a.clone()
                seen.add(id(a))
                return a

            args = [once(a) for a in args]
            kwargs = {k: once(v) for k, v in kwargs.items()}
            return launcher(*args, **kwargs)

        return run


_TWINS = {}


def _traceable_twin(interpreted):
    """A triton JITFunction of `interpreted`'s Python function (what torch's tracing of Triton
    kernels reads: argument names, constexprs, source) whose launches run `interpreted`, the
    interpreter's version of it. Interpreter-only (tests on CPU tensors)."""
    twin = _TWINS.get(interpreted)
    if twin is None:
        # an interpreted @triton.jit kernel (the attention autotuners are off when interpreting)
        assert inspect.isfunction(getattr(interpreted, "fn", None)), interpreted
        twin = _TWINS[interpreted] = _twin_class()(interpreted)
    return twin


@functools.lru_cache(maxsize=None)
def _twin_class():
    from triton.runtime.jit import JITFunction

    class InterpretedJITFunction(JITFunction):
        def __init__(self, interpreted):
            super().__init__(interpreted.fn)
            self.interpreted = interpreted

        def run(self, *args, **kwargs):          # kernel[grid](...) ends here
            return self.interpreted.run(*args, **kwargs)

        # JITFunction hashes its source and that of the jit functions it calls, which are
        # InterpretedFunctions here (it refuses them): one twin per kernel, identity is enough
        __hash__ = object.__hash__

    return InterpretedJITFunction
