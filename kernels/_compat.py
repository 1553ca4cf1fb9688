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
"""

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
