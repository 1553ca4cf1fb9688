"""build_info() and the extension: what make test builds on this machine."""

import os
import sys

import shutil

import pytest
import torch

import fastattn
from fastattn import _ext

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_info_keys_and_types():
    info = fastattn.build_info()
    for key in ("cuda_compiled", "cuda_archs", "cpu_kernels", "torch", "triton", "compiler"):
        assert key in info, key
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["cpu_kernels"], bool)
    assert info["torch"] == torch.__version__


def test_extension_built_with_cpu_kernels():
    # `make test` builds the extension before running the suite; a missing build is a failure.
    info = fastattn.build_info()
    assert info["extension"], info.get("extension_error")
    assert info["cpu_kernels"] is True


def test_cuda_kernels_compiled_when_toolkit_present():
    from build_support import find_cuda_root
    if torch.version.cuda is None or find_cuda_root() is None:
        pytest.skip("a CPU-only torch or no CUDA toolkit: a CPU-only build is the documented "
                    "result")
    if os.environ.get("FASTATTN_SKIP_CUDA_BUILD") == "1":   # make test-compat builds CPU-only
        pytest.skip("FASTATTN_SKIP_CUDA_BUILD=1: a CPU-only build was asked for")
    info = fastattn.build_info()
    assert info["cuda_compiled"] is True
    assert "8.0" in info["cuda_archs"] and "9.0" in info["cuda_archs"]


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_load", lambda: (False, "No module named 'fastattn._C'"))
    try:
        _ext.load_extension()
    except RuntimeError as exc:
        assert "make build" in str(exc)
    else:
        raise AssertionError("load_extension() did not raise")


def test_find_cuda_root_sees_through_wrapper_scripts():
    from build_support import find_cuda_root
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: no wrapper script to see through")
    root = find_cuda_root()
    assert root is not None
    assert os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))
