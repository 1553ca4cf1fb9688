"""This machine: what it is (for the JSON) and its own measured limits, so each result can be
put as a fraction of what the hardware does on plain torch work: matmul FLOP/s from a large
torch.mm and copy bandwidth from a large tensor copy (on the GPU when timing CUDA)."""

import os
import platform
import subprocess
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def describe(device_type):
    import fastattn
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": device_type, "gpu": gpu, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "commit": _commit(), "fastattn_build": fastattn.build_info(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _best_ms(fn, device_type, reps):
    if device_type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="min")
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def measure_limits(device_type, quick=False):
    """{"matmul_gflops": {dtype name: GFLOP/s}, "copy_gbs": GB/s} measured now (best of reps:
    a limit is what the machine can reach, not its typical speed)."""
    dev = torch.device(device_type)
    dtypes = {"fp32": torch.float32}
    if device_type == "cuda":
        dtypes.update(fp16=torch.float16, bf16=torch.bfloat16)
        n, copy_elems = 8192, 1 << 28
    else:
        # Same sizes with --quick (fewer repeats only): smaller ones read low on a busy box.
        n, copy_elems = 2048, 1 << 26
    matmul = {}
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ms = _best_ms(lambda: torch.mm(a, b), device_type, 3 if quick else 5)
        matmul[name] = 2.0 * n ** 3 / ms / 1e6
        del a, b
    src = torch.empty(copy_elems, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device_type, 5 if quick else 10)
    copy_gbs = 2.0 * src.numel() * 4 / ms / 1e6        # read + write
    return {"matmul_gflops": matmul, "copy_gbs": copy_gbs,
            "how": f"best of torch.mm {n}x{n} per dtype; copy_ of {copy_elems * 4 >> 20} MiB fp32"}
