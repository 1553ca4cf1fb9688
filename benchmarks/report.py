"""Text tables of benchmark records, one per op."""


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def op_table(op, records):
    head = (f"{'variant':18} {'shape':24} {'dtype':5} {'dir':7} {'fastattn ms':>11} "
            f"{'torch ms':>9} {'speedup':>7} {'rate':>16} {'of peak':>7} {'mem MiB fa/pt':>14}")
    baselines = sorted({r["baseline"] for r in records})
    lines = [f"== {op} (backend {', '.join(sorted({r['backend'] for r in records}))}; "
             f"PyTorch: {'; '.join(baselines)})", head, "-" * len(head)]
    for r in records:
        left = f"{r['variant'][:18]:18} {r['shape_str'][:24]:24} {r['dtype']:5} {r['direction']:7}"
        if r["status"] == "unavailable":
            lines.append(f"{left} unavailable: {r['error']}")
            continue
        rate = f"{r['fastattn_rate']:.1f}/{r['torch_rate']:.1f} {r['rate_unit']}"
        frac = r["fastattn_peak_fraction"]
        mem = ("-" if r.get("peak_mem_fastattn") is None and r.get("peak_mem_torch") is None
               else f"{_mib(r.get('peak_mem_fastattn'))}/{_mib(r.get('peak_mem_torch'))}")
        line = (f"{left} {r['fastattn_ms']:11.3f} {r['torch_ms']:9.3f} {r['speedup']:6.2f}x "
                f"{rate:>16} {_fmt(frac and 100 * frac, '6.1f')}% {mem:>14}")
        if r["status"] != "ok":
            line += f"  <-- {r['status']}: {r['error']}"
        lines.append(line)
    return "\n".join(lines)


def tables(records):
    ops = []
    for r in records:
        if r["op"] not in ops:
            ops.append(r["op"])
    return "\n\n".join(op_table(op, [r for r in records if r["op"] == op]) for op in ops)


def limits_line(limits):
    mm = ", ".join(f"{k} {v:.1f}" for k, v in limits["matmul_gflops"].items())
    return (f"machine limits: matmul GFLOP/s {mm}; copy {limits['copy_gbs']:.2f} GB/s "
            f"({limits['how']}). 'rate' is fastattn/PyTorch; 'of peak' is fastattn's rate as "
            f"a fraction of the matching limit.")
