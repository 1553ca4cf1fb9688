"""Loading the compiled extension fastattn._C and describing how fastattn was built."""

import functools
import json
import platform

import torch

BUILD_HINT = ("build it with `make build` (or `python setup.py build_ext --inplace` in the "
              "repository), or reinstall fastattn with a C++ compiler available")


@functools.lru_cache(maxsize=None)
def _load():
    """Import fastattn._C once; return (loaded, error message)."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastattn_kernels.*)
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def extension_loaded():
    return _load()[0]


def load_extension():
    """Import fastattn._C or raise a RuntimeError that says how to build it."""
    loaded, err = _load()
    if not loaded:
        raise RuntimeError(f"fastattn's C++/CUDA extension fastattn._C is not available ({err}); "
                           + BUILD_HINT)


@functools.lru_cache(maxsize=None)
def _extension_info():
    if not extension_loaded() or not hasattr(torch.ops.fastattn_kernels, "build_info"):
        return {}
    return json.loads(torch.ops.fastattn_kernels.build_info())


def cuda_kernels_compiled():
    return bool(_extension_info().get("cuda_compiled", False))


def cpu_kernels_compiled():
    return bool(_extension_info().get("cpu_kernels", False))


def build_info():
    """How this fastattn was built and what it runs with.

    Keys: extension (bool, fastattn._C importable), cuda_compiled, cuda_archs, cpu_kernels,
    compiler, torch, torch_cuda, triton, python, and extension_error when it failed to load.
    With the extension also cpu_simd and cpu_gemm: the GEMM engine of the CPU attention tiles,
    "onednn-brgemm" where it works, else "mkl-sgemm" (forced by FASTATTN_CPU_GEMM=mkl).
    """
    info = {
        "extension": extension_loaded(),
        "cuda_compiled": False,
        "cuda_archs": "",
        "cpu_kernels": False,
        "compiler": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not info["extension"]:
        info["extension_error"] = _load()[1]
    info.update(_extension_info())
    return info
