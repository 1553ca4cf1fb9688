"""GPU benchmarks of scripts/gpu_check.sh: one JSON (the CLI's schema plus GPU fields) and a
short text summary, within a time budget.

    python -m benchmarks.gpu_bench --out DIR [--budget-s 150] [--rounds 3] [--dry-run]

Cases, most important first (the budget cuts from the end; what it cut is listed):
  1. attention fwd and fwd+bwd, causal and full, D = 128/64, S = 1k..16k (16k tokens per
     batch, hidden 2048), fp16, fastattn `triton` against F.scaled_dot_product_attention
     pinned to the first available SDPA backend (flash, cuDNN, efficient, in that order);
  2. softmax, LayerNorm, RMSNorm and rotary against PyTorch (benchmarks/cases, GPU shapes);
  3. the attention shapes in bf16 against the same SDPA backend;
  4. all attention shapes against each other available SDPA backend.
Each case runs through benchmarks.runner (dispatch check, result check, interleaved
triton.testing.do_bench medians); rates are also given as fractions of the GPU's measured
matmul FLOP/s and copy bandwidth (benchmarks.machine). The JSON is rewritten after every case,
so a run cut short still leaves its measurements.

--dry-run runs the same code on CPU tensors (backend `cpu`, tiny shapes, the SDPA backends
the CPU has) to check the pipeline and the JSON without a GPU (tests/test_gpu_bench.py).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import machine, runner
from .cases import build_cases
from .cases.attention import attention_flops
from .cases.common import Case, Pair, direct, element_size, fastattn_on, randn

SDPA = "F.scaled_dot_product_attention"
SEQS = (1024, 2048, 4096, 8192, 16384)
DIMS = (128, 64)
DTYPES = (torch.float16, torch.bfloat16)
TOKENS, HIDDEN = 16384, 2048            # batch x sequence and heads x head dim of every shape
ROWWISE_OPS = ("softmax", "layer_norm", "rms_norm", "rotary")
# name in the JSON -> torch.nn.attention.SDPBackend member, in order of preference
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
# the dry run: shapes a 2-core CPU times in seconds
DRY = {"seqs": (128, 256), "dims": (64,), "dtypes": (torch.bfloat16,), "tokens": 256,
       "hidden": 256}


def sdpa_backend_member(name):
    """torch.nn.attention.SDPBackend member for `name`, or None when this torch lacks it."""
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, SDPA_BACKENDS[name], None)


def available_sdpa_backends(device, dtype=torch.float16, names=("flash", "cudnn", "efficient")):
    """The SDPA backends (of `names`, in that order) that run a small causal call on `device`."""
    from torch.nn.attention import sdpa_kernel
    found = []
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    for name in names:
        member = sdpa_backend_member(name)
        if member is None:
            continue
        try:
            with sdpa_kernel(member):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
        except Exception:  # RuntimeError "No available kernel", or a backend that is missing
            continue
        found.append(name)
    return found


def _attention_builder(b, h, s, d, dtype, causal, direction, backend, sdpa_name):
    def build(device):
        import fastattn
        from torch.nn.attention import sdpa_kernel
        member = sdpa_backend_member(sdpa_name)
        q, k, v = (randn((b, h, s, d), dtype, device, direction != "fwd", seed)
                   for seed in (1, 2, 3))

        def ours(q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def sdpa(q, k, v):
            with sdpa_kernel(member):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return Pair(fastattn_on(backend, direct(ours, (q, k, v), direction)),
                    direct(sdpa, (q, k, v), direction))
    return build


def attention_case(s, d, dtype, causal, direction, backend, sdpa_name, tokens=TOKENS,
                   hidden=HIDDEN):
    b, h = max(1, tokens // s), max(1, hidden // d)
    return Case(op="attention", variant="causal" if causal else "full",
                shape={"B": b, "H": h, "S": s, "D": d}, dtype=dtype, direction=direction,
                backend=backend, baseline=f"{SDPA}[{sdpa_name}]",
                build=_attention_builder(b, h, s, d, dtype, causal, direction, backend,
                                         sdpa_name),
                flops=attention_flops(b, h, s, d, causal, direction),
                bytes=4.0 * b * h * s * d * element_size(dtype), bound="compute")


def attention_cases(sdpa_names, backend="triton", seqs=SEQS, dims=DIMS, dtypes=DTYPES,
                    tokens=TOKENS, hidden=HIDDEN):
    """[(sdpa name, Case)] for every shape against each SDPA backend, one backend after the
    other (the first one is the main comparison)."""
    out = []
    for name in sdpa_names:
        for dtype in dtypes:
            for d in dims:
                for s in seqs:
                    for causal in (True, False):
                        for direction in ("fwd", "fwd+bwd"):
                            out.append((name, attention_case(s, d, dtype, causal, direction,
                                                             backend, name, tokens, hidden)))
    return out


def plan(device_type, sdpa_names, dry_run=False):
    """Every (sdpa name or None, Case) to run, in priority order (see the module docstring)."""
    if dry_run:
        backend = "cpu"
        sizes = dict(seqs=DRY["seqs"], dims=DRY["dims"], dtypes=DRY["dtypes"],
                     tokens=DRY["tokens"], hidden=DRY["hidden"])
        rowwise = build_cases("cpu", quick=True, ops=ROWWISE_OPS, backends=["cpu"])
    else:
        backend = "triton"
        sizes = {}
        rowwise = build_cases(device_type, quick=False, ops=ROWWISE_OPS, backends=["triton"])
    attn = attention_cases(sdpa_names, backend, **sizes)
    first = len(attn) // max(1, len(sdpa_names))
    main_dtype = attn[0][1].dtype if attn else None
    primary = [x for x in attn[:first] if x[1].dtype == main_dtype]
    secondary = [x for x in attn[:first] if x[1].dtype != main_dtype]
    return primary + [(None, c) for c in rowwise] + secondary + attn[first:]


def gpu_info(device_type):
    """The GPU fields of the document (null entries on the dry run's CPU)."""
    info = {"name": None, "capability": None, "sm_count": None, "memory_gib": None,
            "torch_cuda": torch.version.cuda, "cudnn": None}
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"sm_{props.major}{props.minor}",
                    sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cudnn=torch.backends.cudnn.version())
    return info


def run_one(sdpa_name, case, device_type, rounds, limits):
    """runner.run_case with the GPU fields; a failure of either side becomes a record."""
    try:
        rec = runner.run_case(case, device_type, rounds=rounds, min_round_ms=20.0,
                              limits=limits, measure_memory=False, warmup=1)
    except Exception as exc:  # e.g. the pinned SDPA backend rejects this shape
        rec = runner.base_record(case, device_type)
        rec.update(status="unavailable",
                   error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    rec["sdpa_backend"] = sdpa_name
    if rec.get("rate_unit") == "GFLOP/s":
        rec["fastattn_tflops"] = rec["fastattn_rate"] / 1e3
        rec["torch_tflops"] = rec["torch_rate"] / 1e3
    return rec


def write_json(doc, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _fmt_rate(rec):
    if rec.get("rate_unit") == "GFLOP/s":
        return f"{rec['fastattn_rate'] / 1e3:.0f} vs {rec['torch_rate'] / 1e3:.0f} TFLOP/s"
    return f"{rec['fastattn_rate']:.0f} vs {rec['torch_rate']:.0f} GB/s"


def summary(doc):
    """A short text summary of a gpu_bench document."""
    m, lim, g = doc["machine"], doc["limits"], doc["gpu_check"]
    lines = [f"fastattn GPU check: {doc['gpu']['name'] or m['cpu'] + ' (dry run, CPU)'}, "
             f"torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, {m['time_utc']}",
             "measured peaks: " + ", ".join(f"{k} matmul {v / 1e3:.0f} TFLOP/s"
                                           for k, v in lim["matmul_gflops"].items())
             + f", copy {lim['copy_gbs']:.0f} GB/s",
             f"SDPA backends: {', '.join(g['sdpa_backends']) or 'none'}"]
    results = doc["results"]
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(f"{len(results)} cases: " + ", ".join(f"{n} {k}" for k, n in
                                                       sorted(counts.items()))
                 + f"; {len(g['skipped_for_budget'])} left out by the "
                 f"{g['budget_s']:.0f} s budget; {g['elapsed_s']:.0f} s")
    lines.append("case | baseline | fastattn ms | baseline ms | speedup | rates | "
                 "fastattn of peak")
    for r in results:
        if r["status"] == "unavailable":
            lines.append(f"{r['case']} | {r['baseline']} | unavailable: {r['error']}")
            continue
        frac = r.get("fastattn_peak_fraction")
        lines.append(f"{r['case']} | {r['baseline']} | {r['fastattn_ms']:.3f} | "
                     f"{r['torch_ms']:.3f} | {r['speedup']:.2f}x | {_fmt_rate(r)} | "
                     + (f"{100 * frac:.0f}%" if frac is not None else "-")
                     + (" MISMATCH" if r["status"] == "mismatch" else ""))
    return "\n".join(lines) + "\n"


def run(out_dir, budget_s=150.0, rounds=3, dry_run=False, log=sys.stderr, limits=None):
    """Measure, writing out_dir/gpu_bench.json after every case and gpu_bench.txt at the end.
    Returns the document. `limits` (machine.measure_limits' dict) skips measuring them."""
    device_type = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("benchmarks.gpu_bench: no CUDA GPU here (use --dry-run on CPU)")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "gpu_bench.json")
    start = time.time()
    limits = limits or machine.measure_limits(device_type, quick=True)
    probe_dtype = DRY["dtypes"][0] if dry_run else torch.float16
    sdpa_names = available_sdpa_backends(device_type, probe_dtype) or ["math"]
    doc = {"machine": machine.describe(device_type), "limits": limits, "results": [],
           "gpu": gpu_info(device_type),
           "gpu_check": {"dry_run": dry_run, "budget_s": budget_s, "rounds": rounds,
                         "sdpa_backends": sdpa_names, "elapsed_s": 0.0,
                         "skipped_for_budget": []}}
    for sdpa_name, case in plan(device_type, sdpa_names, dry_run):
        tag = f"{case.id} vs {case.baseline}"
        if time.time() - start > budget_s:
            doc["gpu_check"]["skipped_for_budget"].append(tag)
            continue
        print(f"gpu_bench: {tag}", file=log, flush=True)
        doc["results"].append(run_one(sdpa_name, case, device_type, rounds, limits))
        doc["gpu_check"]["elapsed_s"] = time.time() - start
        write_json(doc, json_path)
    doc["gpu_check"]["elapsed_s"] = time.time() - start
    write_json(doc, json_path)
    with open(os.path.join(out_dir, "gpu_bench.txt"), "w") as f:
        f.write(summary(doc))
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_bench.json / .txt")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="start no new case after this many seconds (default 150)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per case (default 3)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors, tiny shapes: check the pipeline without a GPU")
    args = ap.parse_args(argv)
    try:
        doc = run(args.out, args.budget_s, args.rounds, args.dry_run)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(summary(doc), end="")
    bad = [r for r in doc["results"] if r["status"] == "mismatch"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
