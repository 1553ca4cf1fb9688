"""A non-editable install ships kernels/ as fastattn.kernels and no top-level `kernels`."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_non_editable_install_ships_fastattn_kernels(tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "FASTATTN_SKIP_EXTENSION": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), ROOT],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "fastattn" / "kernels" / "__init__.py").is_file()
    assert not (target / "kernels").exists(), "a top-level `kernels` package was installed"

    # Import from the installed copy only (not the repository) and check the mapping.
    probe = ("import importlib.util, sys\n"
             "import fastattn, fastattn.kernels\n"
             f"assert fastattn.__file__.startswith({str(target)!r}), fastattn.__file__\n"
             "assert fastattn.kernels.__name__ == 'fastattn.kernels'\n"
             # no top-level `kernels` from the install (a source tree on sys.path, as
             # make test-compat's .pth adds, may provide one: not the install's doing)
             "spec = importlib.util.find_spec('kernels')\n"
             f"assert spec is None or not spec.origin.startswith({str(target)!r}), spec\n"
             "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


def test_make_test_gpu_without_a_gpu_exits_2_in_one_line():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    run = subprocess.run(["make", "--no-print-directory", "-s", "test-gpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout.strip() == ("make test-gpu: no CUDA GPU visible to "
                                  f"{sys.executable} (torch.cuda.is_available() is False); "
                                  "nothing run")


def test_gpu_test_mode_refuses_the_interpreter(tmp_path):
    # What make test-gpu runs must be compiled Triton on CUDA tensors: with FASTATTN_TEST_GPU=1
    # the harness stops when the interpreter is on or there is no GPU.
    env = {**os.environ, "FASTATTN_TEST_GPU": "1", "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
                          os.path.join(ROOT, "tests", "test_reference.py"), "-x"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "FASTATTN_TEST_GPU=1 needs a CUDA GPU and TRITON_INTERPRET unset" in run.stderr
