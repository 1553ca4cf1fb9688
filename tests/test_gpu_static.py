"""GPU static report tests (the checks themselves are in gpu_static_checks.py).

Compiling for a GPU target needs real JIT functions; under the interpreter (`make test` sets
TRITON_INTERPRET=1) triton.jit gives InterpretedFunctions, so the checks then run in a child
process without the interpreter.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastattn.kernels._compat import interpreting  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

if interpreting():
    def test_static_report_checks_in_a_compiling_process():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-p", "no:xdist", os.path.join(HERE, "gpu_static_checks.py")],
                             capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(HERE))
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
else:
    from gpu_static_checks import *  # noqa: F401,F403  (collected here)
