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
