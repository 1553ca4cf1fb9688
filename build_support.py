"""Build helpers for setup.py, importable by tests without running setup()."""

import os
import shutil


def find_cuda_root():
    """Return the CUDA toolkit root whose headers exist, or None.

    torch guesses the root from the nvcc on PATH; on machines where that nvcc is a wrapper
    script outside the toolkit (/usr/local/bin/nvcc here) the guess lacks cuda_runtime_api.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script that execs the real nvcc: read the path it names.
        try:
            with open(real, "r", errors="ignore") as f:
                for token in f.read(4096).split():
                    if token.endswith("/bin/nvcc") and os.path.isfile(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")) \
                and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


# ----------------------------------------------------------------------------- CPU target

# The portable x86-64 target: AVX2 + FMA + F16C (Haswell / Zen and later). ATen's AVX2 vectors
# need F16C for their fp16 conversions; csrc/cpu/cpu_capability.h picks at::vec's AVX2
# implementation from the __AVX2__/__FMA__/__F16C__ these define.
PORTABLE_X86_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _env_flag(env, name):
    return env.get(name, "0").lower() in ("1", "true", "yes", "on")


def cpu_arch(env=None, machine=None):
    """(name, compiler flags) of the CPU the C++ kernels are compiled for.

    FASTATTN_CPU_ARCH=portable (the default: runs on any x86-64 with AVX2/FMA/F16C; on other
    machines the compiler's default target), =native (-march=native: the build machine's own
    ISA, e.g. AVX-512, and nothing older), or any other -march value (e.g. x86-64-v4,
    sapphirerapids). FASTATTN_NATIVE=1 and FASTATTN_PORTABLE=1 are shorthands (the Makefile
    sets FASTATTN_NATIVE=1, so FASTATTN_PORTABLE=1 wins over it); an explicit FASTATTN_CPU_ARCH
    wins over both.
    """
    import platform

    env = os.environ if env is None else env
    machine = (machine or platform.machine()).lower()
    name = env.get("FASTATTN_CPU_ARCH", "").strip()
    if not name:
        native = _env_flag(env, "FASTATTN_NATIVE") and not _env_flag(env, "FASTATTN_PORTABLE")
        name = "native" if native else "portable"
    if name == "portable":
        x86 = machine in ("x86_64", "amd64", "i686", "i386")
        return name, (list(PORTABLE_X86_FLAGS) if x86 else [])
    if name.startswith("-") or any(c.isspace() for c in name):
        raise ValueError(f"FASTATTN_CPU_ARCH: expected portable, native or a -march value, "
                         f"got {name!r}")
    return name, [f"-march={name}"]


# ----------------------------------------------------------------------------- torch

def import_torch_for_build():
    """Import the torch the extension is built against: the one of the environment fastattn is
    being installed into.

    A C++ extension must be compiled against the torch it will run with (the C++ ABI differs
    between releases), so pyproject.toml does not list torch in its build requirements (pip's
    isolated build environment would then hold a second, newer torch). pip's isolated build
    hides the target environment's site-packages; they are still what site.getsitepackages()
    names, so look there (appended: the isolated build tools keep precedence).
    """
    try:
        import torch
        return torch
    except ImportError:
        pass
    import importlib
    import site
    import sys

    for path in site.getsitepackages():
        if os.path.isdir(os.path.join(path, "torch")) and path not in sys.path:
            sys.path.append(path)
            try:
                torch = importlib.import_module("torch")
            except ImportError:
                sys.path.remove(path)
                continue
            print(f"fastattn: building against torch {torch.__version__} from {path}")
            return torch
    raise RuntimeError(
        "fastattn builds its C++ extension against the torch already installed in the target "
        "environment, and found none: install torch (>= 2.6) first, e.g. `pip install torch`, "
        "then `pip install .` (or set FASTATTN_SKIP_EXTENSION=1 for a pure-Python install)")
