"""fastattn benchmark CLI (what `make bench` runs).

    python -m benchmarks [--quick] [--device cpu|cuda] [--ops OP ...] [--json PATH]
                         [--plot DIR] [--static] [--threads N] [--backends NAME ...]

Times every case of the chosen ops with fastattn and its PyTorch counterpart interleaved in
this process (median of rounds), prints one table per op, and optionally writes JSON (schema:
benchmarks/README.md) and PNG plots. Ops: attention softmax layer_norm rms_norm rotary mha e2e,
and hf (Hugging Face models; only when named).
"""

import argparse
import json
import sys

import torch

from . import machine, report, runner
from .cases import MODEL_OPS, OPS, build_cases

ALL_OPS = OPS + ("e2e",)
CHOICES = ALL_OPS + MODEL_OPS          # hf: Hugging Face models, only when named


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="main shapes only, fewer rounds (under 2 minutes on 2 CPU cores)")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", choices=CHOICES, metavar="OP",
                    help=f"subset of {' '.join(CHOICES)} (default: all but hf; --quick "
                         f"leaves out e2e)")
    ap.add_argument("--backends", nargs="+", help="fastattn backends to time "
                    "(default: cpu on CPU, triton and cuda on CUDA)")
    ap.add_argument("--json", metavar="PATH", help="write {machine, limits, results} here")
    ap.add_argument("--plot", metavar="DIR", help="write PNG plots into this directory")
    ap.add_argument("--static", action="store_true",
                    help="fold in the GPU static report (automatic with --device cuda)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--rounds", type=int, help="timing rounds per case (default 7, quick 5)")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.ops is None:
        args.ops = list(OPS) if args.quick else list(ALL_OPS)
    return args


def run_micro(args, limits):
    from tqdm import tqdm
    cases = build_cases(args.device, args.quick, [o for o in args.ops if o != "e2e"],
                        args.backends)
    rounds = args.rounds or (5 if args.quick else 7)
    min_ms = 20.0 if args.quick else 50.0
    records = []
    bar = tqdm(cases, desc="benchmarks", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.id, refresh=True)
        # The result check already ran each side once; --quick warms up once more only.
        records.append(runner.run_case(case, args.device, rounds, min_ms, limits,
                                       measure_memory=not args.no_memory,
                                       warmup=1 if args.quick else 2))
    return records


def run_e2e(args):
    from . import e2e
    backend = (args.backends or (["cpu"] if args.device == "cpu" else ["triton"]))[0]
    print("e2e: training the GPT on both stacks ...", file=sys.stderr)
    return e2e.run(args.device, backend, args.quick, rounds=3 if args.quick else 5)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine.describe(args.device)
    print(f"fastattn benchmarks on {args.device}: {info['cpu']} ({info['threads']} threads)"
          + (f", {info['gpu']}" if info["gpu"] else "") + f"; torch {info['torch']}, "
          f"commit {info['commit']}", file=sys.stderr)
    limits = machine.measure_limits(args.device, args.quick)
    records = run_micro(args, limits) if any(o != "e2e" for o in args.ops) else []
    if "e2e" in args.ops:
        records += run_e2e(args)

    micro = [r for r in records if r["op"] != "e2e"]
    if micro:
        print(report.limits_line(limits))
        print(report.tables(micro))
    if "e2e" in args.ops:
        from . import e2e
        print("\n" + e2e.table([r for r in records if r["op"] == "e2e"]))

    static, static_errors = None, []
    if args.static or args.device == "cuda":
        from . import static_report
        print("GPU static report: compiling kernels ...", file=sys.stderr)
        static, static_errors = static_report.collect(args.quick)
        if static is not None:
            print("\n" + static_report.summary(static))
        for err in static_errors:
            print(f"== GPU static report, part unavailable: {err}")

    if args.json:
        doc = {"machine": info, "limits": limits, "results": records}
        if static is not None or static_errors:
            doc["static"] = static or []
            doc["static_errors"] = static_errors
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        from . import plots
        for path in plots.write_all(records, args.plot):
            print(f"wrote {path}")
    bad = [r for r in records if r["status"] == "mismatch"]
    for r in bad:
        print(f"MISMATCH {r['case']}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
