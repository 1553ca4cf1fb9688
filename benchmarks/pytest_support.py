"""Shared body of the pytest-benchmark files: time one side of a Case with the `benchmark`
fixture, grouped so pytest-benchmark's table puts fastattn and PyTorch side by side."""

import os

import pytest
import torch

from . import runner
from .cases import build_cases

IMPLS = ("fastattn", "torch")


def device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def cases(*ops):
    full = os.environ.get("FASTATTN_BENCH_FULL") == "1"
    return build_cases(device_type(), quick=not full, ops=ops)


def run(benchmark, case, impl):
    dev = device_type()
    benchmark.group = f"{case.op} {case.variant} {case.shape_str} {case.dtype_name} " \
                      f"{case.direction}".replace("  ", " ")
    benchmark.extra_info.update(backend=case.backend, baseline=case.baseline, flops=case.flops,
                                bytes=case.bytes, impl=impl)
    if impl == "fastattn":
        pair, reason = runner.prepare(case, dev)
        if pair is None:
            pytest.skip(f"fastattn side unavailable: {reason}")
        fn = pair.fastattn
    else:
        try:
            fn = case.build(torch.device(dev)).torch
        except Exception as exc:  # e.g. fastattn.MultiHeadAttention not there yet
            pytest.skip(f"case cannot be built: {exc}")
    if dev == "cuda":
        import triton.testing
        benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(fn, return_mode="median")

        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
