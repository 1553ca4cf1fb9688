"""PNG plots of benchmark records (matplotlib, Agg backend: no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(r, *keys):
    return " ".join(str(r[k]) for k in keys if r[k])


def _ok(records):
    return [r for r in records if r["status"] in ("ok", "mismatch")]


def speedup_per_op(records, path):
    rs = _ok(records)
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(rs))))
    ops = sorted({r["op"] for r in rs})
    colors = {op: plt.cm.tab10(i) for i, op in enumerate(ops)}
    labels = [_label(r, "op", "variant", "shape_str", "dtype", "direction") for r in rs]
    ax.barh(range(len(rs)), [r["speedup"] for r in rs], color=[colors[r["op"]] for r in rs])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rs)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (PyTorch time / fastattn time)")
    ax.set_title("fastattn speedup over PyTorch per case")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_vs_seqlen(records, path):
    """Time vs sequence length for attention at the most common (B*S, H, D) family."""
    rs = [r for r in _ok(records) if r["op"] == "attention" and r["baseline"].startswith("F.")]
    groups = {}
    for r in rs:
        key = (r["direction"], r["dtype"], r["shape"]["H"], r["shape"]["D"])
        groups.setdefault(key, []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["shape"]["S"] for r in v}) >= 2}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, ((direction, dtype, h, d), group) in zip(axes[0], sorted(groups.items())):
        for variant, style in (("causal", "-"), ("full", "--")):
            pts = sorted((r["shape"]["S"], r) for r in group if r["variant"] == variant)
            if not pts:
                continue
            s = [p[0] for p in pts]
            # Per token (ms / (B*S)) so the batch size chosen per length does not skew lines.
            per_tok = lambda r, k: r[k] / (r["shape"]["B"] * r["shape"]["S"]) * 1e3  # noqa: E731
            ax.plot(s, [per_tok(r, "fastattn_ms") for _, r in pts], style, marker="o",
                    label=f"fastattn {variant}")
            ax.plot(s, [per_tok(r, "torch_ms") for _, r in pts], style, marker="x",
                    label=f"SDPA {variant}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("µs per token (all heads)")
        ax.set_title(f"attention {direction} {dtype} H={h} D={d}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_fwd_bwd(records, path):
    rs = [r for r in _ok(records) if r.get("peak_mem_fastattn") is not None
          and r.get("peak_mem_torch") is not None
          and abs(r["peak_mem_fastattn"] - r["peak_mem_torch"]) > 0.02 * r["peak_mem_torch"]]
    if not rs:
        return None
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(rs))))
    y = range(len(rs))
    ax.barh([i - 0.2 for i in y], [r["peak_mem_fastattn"] / 2**20 for r in rs], height=0.4,
            label="fastattn")
    ax.barh([i + 0.2 for i in y], [r["peak_mem_torch"] / 2**20 for r in rs], height=0.4,
            label="PyTorch")
    ax.set_yticks(list(y), [_label(r, "op", "variant", "shape_str", "dtype") for r in rs],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("peak memory allocated during forward+backward (MiB)")
    ax.set_title("forward+backward peak memory (cases where it differs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(records, directory):
    os.makedirs(directory, exist_ok=True)
    made = [speedup_per_op(records, os.path.join(directory, "speedup.png")),
            attention_vs_seqlen(records, os.path.join(directory, "attention_seqlen.png")),
            memory_fwd_bwd(records, os.path.join(directory, "memory_fwd_bwd.png"))]
    return [p for p in made if p]
