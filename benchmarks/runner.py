"""Run one Case: build it, check the fastattn side really ran on the requested backend and
agrees with PyTorch, time both side by side, and return a JSON-ready record (schema in
benchmarks/README.md)."""

import torch

from . import memory, timing

# Largest scaled difference max|fastattn - PyTorch| / max(1, max|PyTorch|), per output tensor,
# accepted before a record is flagged "mismatch". Loose on purpose: the parity tests are the
# real correctness check; this catches a benchmark timing garbage. Scaled, because in bf16
# PyTorch's own weight gradients of a norm over 4096 rows are off by ~17 at magnitude ~230
# (measured against fp32), so an absolute bound would flag the more accurate side.
SCALED_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _flatten(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


def differences(a, b):
    """(max absolute difference, max scaled difference) over the tensors of two results."""
    absolute, scaled = 0.0, 0.0
    for x, y in zip(_flatten(a), _flatten(b)):
        if not x.numel():
            continue
        d = (x.float() - y.float()).abs().max().item()
        absolute = max(absolute, d) if d == d else d          # keep NaN visible
        s = d / max(1.0, y.float().abs().max().item())
        scaled = max(scaled, s) if s == s else s
    return absolute, scaled


def _dispatch_problem(calls, backend):
    if not calls:
        return "the fastattn callable dispatched no fastattn kernel"
    wrong = sorted({f"{op}->{be}" for op, be in calls if be != backend})
    return f"dispatched off backend {backend!r}: {', '.join(wrong)}" if wrong else None


def base_record(case, device_type):
    return {"op": case.op, "case": case.id, "variant": case.variant, "shape": case.shape,
            "shape_str": case.shape_str, "dtype": case.dtype_name, "direction": case.direction,
            "backend": case.backend, "baseline": case.baseline, "device": device_type,
            "bound": case.bound, "flops": float(case.flops), "bytes": float(case.bytes),
            "status": "ok", "error": None}


def _rates(record, case, limits):
    for side in ("fastattn", "torch"):
        ms = record[f"{side}_ms"]
        if case.bound == "compute":
            rate = case.flops / ms / 1e6                       # GFLOP/s
            peak = limits["matmul_gflops"].get(case.dtype_name,
                                               limits["matmul_gflops"]["fp32"]) if limits else None
        else:
            rate = case.bytes / ms / 1e6                       # GB/s
            peak = limits["copy_gbs"] if limits else None
        record[f"{side}_rate"] = rate
        record[f"{side}_peak_fraction"] = rate / peak if peak else None
    record["rate_unit"] = "GFLOP/s" if case.bound == "compute" else "GB/s"


def prepare(case, device_type):
    """(Pair, None) ready to time, or (None, reason) when the fastattn side cannot run."""
    import fastattn
    from fastattn import _backend
    reason = _backend.unavailable_reason(case.backend, device_type)
    if reason is not None:
        return None, f"backend {case.backend!r} unavailable: {reason}"
    try:
        pair = case.build(torch.device(device_type))
        with fastattn.record_dispatch() as calls:
            pair.fastattn()
    except Exception as exc:  # a missing or half-written module must not sink the suite
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    problem = _dispatch_problem(calls, case.backend)
    return (None, problem) if problem else (pair, None)


def run_case(case, device_type, rounds=7, min_round_ms=50.0, limits=None,
             measure_memory=True, slowdown=1, warmup=2):
    """Time one case. slowdown > 1 runs the fastattn callable that many times per call (the
    gate's self-test uses it to prove that a slower kernel fails the gate)."""
    record = base_record(case, device_type)
    pair, reason = prepare(case, device_type)
    if pair is None:
        record.update(status="unavailable", error=reason)
        return record
    fa = pair.fastattn
    if slowdown > 1:
        def fa():
            for _ in range(slowdown - 1):
                pair.fastattn()
            return pair.fastattn()
    absolute, scaled = differences(fa(), pair.torch())
    record.update(max_abs_diff=absolute, max_scaled_diff=scaled)
    tol = case.compare_tol if case.compare_tol is not None else SCALED_TOL.get(case.dtype, 1e-3)
    if not scaled <= tol:                    # also catches NaN
        record.update(status="mismatch", error=f"max |fastattn - torch| / max(1, |torch|) = "
                                               f"{scaled:.3g} > {tol:g}")
    record.update(timing.time_pair(fa, pair.torch, device_type, rounds, min_round_ms, warmup))
    _rates(record, case, limits)
    record["peak_mem_fastattn"] = record["peak_mem_torch"] = None
    if measure_memory and case.direction == "fwd+bwd":
        record["peak_mem_fastattn"] = memory.peak_bytes(fa, device_type)
        record["peak_mem_torch"] = memory.peak_bytes(pair.torch, device_type)
    return record
