"""The supported version range and what handles it: fastattn/_compat.py (torch),
kernels/_compat.py (Triton), build_support.cpu_arch (the CPU target), and that the floor is
stated the same way everywhere (setup.py, requirements-compat.txt, fastattn._compat)."""

import os
import re
import sys
import types
import warnings

import pytest
import torch
import triton
import triton.language as tl

import fastattn
from fastattn import _compat as torch_compat
from fastattn.kernels import _compat as triton_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)   # after site-packages: the compat leg tests an installed fastattn
import build_support  # noqa: E402


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


# ----------------------------------------------------------------------------- the range

def test_floor_is_the_same_in_setup_requirements_and_runtime_check():
    floor = ".".join(map(str, torch_compat.TORCH_FLOOR))
    assert f'"torch>={floor}"' in _read("setup.py")
    pins = dict(re.findall(r"^(torch|triton|numpy)==(\S+)", _read("requirements-compat.txt"),
                           re.M))
    assert torch_compat.parse_version(pins["torch"]) == torch_compat.TORCH_FLOOR
    assert "triton>=3.2" in _read("setup.py") and pins["triton"].startswith("3.2.")


def test_pyproject_builds_without_a_second_torch():
    text = _read("pyproject.toml")
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", text, re.M | re.S).group(1)
    assert "setuptools" in requires
    assert "torch" not in requires     # the build uses the target environment's torch


@pytest.mark.parametrize("text, expected", [("2.6.0", (2, 6)), ("2.14.1+cu130", (2, 14)),
                                            ("2.7.0a0+git1234", (2, 7)), ("3", (3, 0))])
def test_parse_version(text, expected):
    assert torch_compat.parse_version(text) == expected


def test_check_torch_names_the_floor_when_library_apis_are_missing():
    old = types.SimpleNamespace(custom_op=object())       # a torch.library without the rest
    with pytest.raises(ImportError, match=r"torch >= 2\.6.*register_fake.*found torch 2\.3\.1"):
        torch_compat.check_torch("2.3.1", old)


def test_check_torch_warns_below_the_tested_floor_only():
    with pytest.warns(RuntimeWarning, match="tested with torch >= 2.6"):
        torch_compat.check_torch("2.5.1", torch.library)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_compat.check_torch("2.6.0", torch.library)
        torch_compat.check_torch(torch.__version__, torch.library)


def test_build_info_names_the_build():
    info = fastattn.build_info()
    if not info["extension"]:
        pytest.fail(f"fastattn._C missing: {info.get('extension_error')}")
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert info["cpu_arch"] not in ("", "unknown")


# ----------------------------------------------------------------------------- Triton

def test_interpreter_hooks_of_the_test_harness_exist():
    assert triton_compat.missing_interpreter_hooks() == []


def test_missing_interpreter_hook_is_reported(monkeypatch):
    from triton.runtime import interpreter
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl",
                        lambda self, value, to: None)
    assert any(m.startswith("InterpreterBuilder.cast_impl")
               for m in triton_compat.missing_interpreter_hooks())


def test_autotuner_is_built_on_first_launch(monkeypatch):
    built = []

    def fake_autotune(**kwargs):
        built.append(kwargs)
        return lambda fn: {"grid": lambda *a, **k: ("launched", fn)}

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    tuned = triton_compat.autotune(configs=[], key=["N"])(_copy_kernel)
    assert built == []                                  # nothing at import/definition time
    assert tuned["grid"]() == ("launched", _copy_kernel)
    tuned["grid"]()
    assert built == [{"configs": [], "key": ["N"]}]     # built once


@triton.jit
def _copy_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"}


def test_ast_source_on_the_installed_triton():
    src = triton_compat.ast_source(_copy_kernel, SIG, {"BLOCK": 64})
    assert src.name == "_copy_kernel"
    assert 64 in src.constants.values()


def test_ast_source_triton_3_2_form(monkeypatch):
    """Triton 3.2's ASTSource(fn, signature, constants): runtime args only, constants by name."""
    import triton.compiler

    class ASTSource32:
        def __init__(self, fn, signature, constants=None, attrs=None):
            self.signature, self.constants = signature, constants

    monkeypatch.setattr(triton.compiler, "ASTSource", ASTSource32)
    src = triton_compat.ast_source(_copy_kernel, SIG, {"BLOCK": 64})
    assert src.signature == {"x_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32"}
    assert src.constants == {"BLOCK": 64}


# ----------------------------------------------------------------------------- CPU target

@pytest.mark.parametrize("env, machine, name, flags", [
    ({}, "x86_64", "portable", ["-mavx2", "-mfma", "-mf16c"]),
    ({}, "aarch64", "portable", []),
    ({"FASTATTN_NATIVE": "1"}, "x86_64", "native", ["-march=native"]),
    ({"FASTATTN_PORTABLE": "1"}, "x86_64", "portable", ["-mavx2", "-mfma", "-mf16c"]),
    ({"FASTATTN_NATIVE": "1", "FASTATTN_PORTABLE": "1"}, "x86_64", "portable",
     ["-mavx2", "-mfma", "-mf16c"]),
    ({"FASTATTN_NATIVE": "1", "FASTATTN_CPU_ARCH": "x86-64-v4"}, "x86_64", "x86-64-v4",
     ["-march=x86-64-v4"]),
])
def test_cpu_arch(env, machine, name, flags):
    assert build_support.cpu_arch(env, machine) == (name, flags)


@pytest.mark.parametrize("bad", ["-O0", "native -mfoo"])
def test_cpu_arch_rejects_flags(bad):
    with pytest.raises(ValueError, match="FASTATTN_CPU_ARCH"):
        build_support.cpu_arch({"FASTATTN_CPU_ARCH": bad}, "x86_64")
