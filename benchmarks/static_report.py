"""Fold the GPU static report (benchmarks.gpu_static, compiled cubins read without a GPU) into
the benchmark output: its records go into the JSON under "static" and a summary is printed."""

import importlib.util


def available():
    return importlib.util.find_spec("benchmarks.gpu_static") is not None


def collect(quick):
    """(records, errors): the static records that could be produced and, per part that could
    not (Triton kernels, CUDA extension), why. records is None when nothing could be."""
    if not available():
        return None, ["benchmarks/gpu_static.py is not present"]
    from . import gpu_static
    records, errors = [], []
    # --quick samples two configurations per kernel; the full run compiles every variant.
    parts = (("triton", lambda: gpu_static.triton_records(per_kernel=2 if quick else None)),
             ("cuda", lambda: gpu_static.cuda_records()))
    for name, part in parts:
        try:
            records += part()
        except Exception as exc:  # a missing tool or a broken part must not sink the rest
            errors.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0][:300])
    return (records if records or not errors else None), errors


def summary(records):
    from . import gpu_static
    bad = [(r, gpu_static.problems(r)) for r in records if gpu_static.problems(r)]
    kernels = sorted({r["kernel"] for r in records})
    lines = [f"== GPU static report: {len(records)} compiled variants of {len(kernels)} kernels, "
             f"{len(bad)} with problems"]
    mma = sum(r["mma"]["HMMA"] + r["mma"]["HGMMA"] for r in records)
    lines.append(f"   max registers {max((r['registers'] for r in records), default=0)}, "
                 f"max shared {max((r['shared_bytes'] for r in records), default=0)} B, "
                 f"tensor-core instructions {mma}")
    for r, why in bad[:20]:
        lines.append(f"   {r['source']} {r['arch']} {r['kernel']} {r['config']}: {', '.join(why)}")
    return "\n".join(lines)
