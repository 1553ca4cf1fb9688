"""Timing two callables side by side: median of rounds, interleaved in one process.

CPU: each round times a burst of calls of each callable with perf_counter, alternating which
goes first, so drift (turbo, other processes on a shared machine) hits both sides alike.
CUDA: triton.testing.do_bench (through CUDA graphs when the callable can be captured), one
call per side per round, also interleaved.
"""

import statistics
import time

import torch


def _sync(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def _burst_ms(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def _calibrate(fn, min_round_ms):
    """Calls per burst so that one burst lasts about min_round_ms (at least 1)."""
    once = _burst_ms(fn, 1)
    return max(1, min(1000, int(min_round_ms / max(once, 1e-3)) + 1))


def _cuda_ms(fn, use_graphs):
    import triton.testing
    if use_graphs:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), \
                "do_bench_cudagraph"
        except Exception:  # not capturable (host syncs, allocator use): plain do_bench
            pass
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"


def time_pair(fastattn_fn, torch_fn, device_type="cpu", rounds=7, min_round_ms=50.0,
              warmup=2):
    """Per-round ms of each callable and the speedup (median over rounds of torch/fastattn)."""
    for _ in range(warmup):
        fastattn_fn()
        torch_fn()
    _sync(device_type)
    fa_ms, pt_ms = [], []
    timer = "perf_counter-interleaved"
    if device_type == "cuda":
        # Graphs only if both sides can be captured, so both are timed the same way.
        graphs = all(_cuda_ms(fn, True)[1] == "do_bench_cudagraph"
                     for fn in (fastattn_fn, torch_fn))
        for r in range(rounds):
            order = ((fastattn_fn, fa_ms), (torch_fn, pt_ms))
            for fn, sink in (order if r % 2 == 0 else order[::-1]):
                ms, timer = _cuda_ms(fn, graphs)
                sink.append(ms)
    else:
        n_fa, n_pt = _calibrate(fastattn_fn, min_round_ms), _calibrate(torch_fn, min_round_ms)
        for r in range(rounds):
            order = ((fastattn_fn, n_fa, fa_ms), (torch_fn, n_pt, pt_ms))
            for fn, n, sink in (order if r % 2 == 0 else order[::-1]):
                sink.append(_burst_ms(fn, n))
    ratios = [p / f for f, p in zip(fa_ms, pt_ms)]
    return {"fastattn_ms": statistics.median(fa_ms), "torch_ms": statistics.median(pt_ms),
            "speedup": statistics.median(ratios), "fastattn_ms_rounds": fa_ms,
            "torch_ms_rounds": pt_ms, "rounds": rounds, "timer": timer}
