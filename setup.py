"""Build fastattn and its extension fastattn._C.

C++ CPU kernels are always built; CUDA kernels too when torch is a CUDA build and a real CUDA
toolkit is found. Switches (environment variables):

  FASTATTN_SKIP_CUDA_BUILD=1   CPU-only extension
  FASTATTN_SKIP_EXTENSION=1    no extension at all (pure-Python install; used by `make` for the
                               editable install, after which the extension is built in place)
  FASTATTN_CUDA_ARCHS          compute capabilities, default "8.0;9.0"
  FASTATTN_CPU_ARCH            CPU target of the C++ kernels: portable (default: x86-64 with
                               AVX2/FMA/F16C), native (-march=native; `make` sets it through
                               FASTATTN_NATIVE=1) or any -march value (x86-64-v4, ...)
  FASTATTN_NATIVE=1            shorthand for FASTATTN_CPU_ARCH=native
  FASTATTN_PORTABLE=1          shorthand for FASTATTN_CPU_ARCH=portable (wins over NATIVE)
  FASTATTN_ASAN=1              CPU kernels with AddressSanitizer (make asan)
  MAX_JOBS                     parallel compile jobs (ninja)

The extension is compiled against the torch of the environment it is installed into (see
build_support.import_torch_for_build), so `pip install .` needs torch installed first.
"""

import glob
import os
import sys
import warnings

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_support import cpu_arch, find_cuda_root, import_torch_for_build  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension_modules():
    if _flag("FASTATTN_SKIP_EXTENSION"):
        return [], {}
    torch = import_torch_for_build()
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpu_sources:
        warnings.warn("fastattn: no C++ sources found; building without fastattn._C")
        return [], {}

    with_cuda = False
    if _flag("FASTATTN_SKIP_CUDA_BUILD"):
        print("fastattn: FASTATTN_SKIP_CUDA_BUILD=1, building the CPU kernels only")
    elif torch.version.cuda is None:
        print("fastattn: torch is a CPU build, building the CPU kernels only")
    elif not cuda_sources:
        print("fastattn: no CUDA sources, building the CPU kernels only")
    else:
        root = find_cuda_root()
        if root is None:
            warnings.warn("fastattn: nvcc/CUDA toolkit not found; building the CPU kernels only "
                          "(set CUDA_HOME to build the CUDA kernels)")
        else:
            print(f"fastattn: using CUDA toolkit at {root}")
            os.environ["CUDA_HOME"] = root
            cpp_extension.CUDA_HOME = root  # torch read CUDA_HOME at import; correct its guess
            with_cuda = True

    archs = os.environ.get("FASTATTN_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if _flag("FASTATTN_ASAN"):
        # -O2: the sanitized build then runs the same vectorised, FMA-contracted arithmetic as
        # the -O3 one (at -O1 fp32 rounding differs enough to move tight parity bounds).
        cxx_flags = ["-O2", "-g", "-std=c++20", "-fopenmp", "-fsanitize=address",
                     "-fno-omit-frame-pointer"]
    # A wheel may run on another machine than it was built on: portable (AVX2) by default;
    # `make` builds where it runs and asks for -march=native (ASan builds too, so they check
    # the same SIMD code paths). csrc/cpu/cpu_capability.h derives at::vec's CPU_CAPABILITY
    # from the flags these enable.
    arch_name, arch_flags = cpu_arch()
    print(f"fastattn: CPU kernels for {arch_name} ({' '.join(arch_flags) or 'compiler default'})")
    cxx_flags += arch_flags
    define_macros = [("FASTATTN_WITH_CUDA", "1" if with_cuda else "0"),
                     ("FASTATTN_CUDA_ARCHS", '"' + archs + '"'),
                     ("FASTATTN_CPU_ARCH", '"' + arch_name + '"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    link_args = ["-fopenmp"] + (["-fsanitize=address"] if _flag("FASTATTN_ASAN") else [])
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastattn._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr", "-Xptxas=-v"],
            },
            extra_link_args=link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastattn._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention, softmax, norm and RoPE kernels behind drop-in PyTorch modules",
    python_requires=">=3.10",
    packages=["fastattn", "fastattn.ops", "fastattn.nn", "fastattn.kernels",
              "fastattn.distributed",
              "fastattn.integrations"],
    # kernels/ ships as fastattn.kernels; no top-level `kernels` package is installed
    # (that name belongs to an unrelated PyPI project).
    package_dir={"fastattn.kernels": "kernels"},
    # The tested range (README "Supported versions"): the floor is what `make test-compat` runs.
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton>=3.2; platform_system == 'Linux'"],
                    "transformers": ["transformers>=5.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
