"""Dev timing of the C++ CPU attention kernels against torch SDPA, side by side in one process.

    python benchmarks/_dev_attention_cpu.py [--dev] [--threads 2] [--rounds 7] [--shape B H S D]
                                           [--dropout P]

--dev builds the kernels as a throw-away module (/tmp/h3a_build) instead of importing
fastattn._C. Prints PyTorch time / ours (median of interleaved rounds, wall and CPU time) and
GFLOP/s (causal counts half the score matrix; fwd+bwd counts 3.5x the forward FLOPs).
--dropout P runs both sides with attention dropout P (SDPA then takes its math path on CPU).
"""
import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ops(dev):
    if not dev:
        import fastattn._C  # noqa: F401  registers torch.ops.fastattn_kernels
        return
    from torch.utils.cpp_extension import load
    build = "/tmp/h3a_build"
    os.makedirs(build, exist_ok=True)
    src = os.path.join(ROOT, "csrc")
    load(name="fa_attn_dev",
         sources=[os.path.join(src, f) for f in
                  ("attention.cpp", "cpu/attention_fwd.cpp", "cpu/attention_bwd.cpp")],
         extra_include_paths=[src], extra_cflags=["-O3", "-march=native", "-fopenmp"],
         extra_ldflags=["-fopenmp"], build_directory=build, is_python_module=False)


def ours_fwd(q, k, v, causal, p=0.0):
    return torch.ops.fastattn_kernels.attention_forward(q, k, v, None, 1 / math.sqrt(q.shape[-1]),
                                                causal, False, -1, -1, 0.0, None, p, 1, 2)


def ours_fwd_bwd(q, k, v, causal, dout, p=0.0):
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = torch.ops.fastattn_kernels.attention_forward(q, k, v, None, scale, causal, False,
                                                    -1, -1, 0.0, None, p, 1, 2)
    return torch.ops.fastattn_kernels.attention_backward(dout, q, k, v, out, lse, None, scale, causal,
                                                 False, -1, -1, 0.0, None, False, p, 1, 2)


def sdpa_fwd_bwd(q, k, v, causal, dout, p=0.0):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)
    out.backward(dout)
    return q.grad, k.grad, v.grad


def median_times(fns, rounds):
    """Median wall and CPU (process) times of each candidate. Rounds interleave the candidates
    so machine noise hits them alike; CPU time is less sensitive to other processes sharing
    the cores than wall time."""
    for f in fns:
        f()  # warm-up
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(rounds):
        for w, c, f in zip(wall, cpu, fns):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            w.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 8, 512, 64])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_ops(args.dev)
    B, H, S, D = args.shape
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(4))
    p = args.dropout
    full = 4 * B * H * S * S * D  # forward FLOPs of the full score matrix
    for name, causal, bwd in [("fwd causal", True, False), ("fwd", False, False),
                              ("fwd+bwd causal", True, True)]:
        if bwd:
            fns = [lambda: sdpa_fwd_bwd(q, k, v, causal, dout, p),
                   lambda: ours_fwd_bwd(q, k, v, causal, dout, p)]
            flops = full * 3.5  # fwd 2 GEMMs + bwd 5 GEMMs
        else:
            fns = [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                          dropout_p=p),
                   lambda: ours_fwd(q, k, v, causal, p)]
            flops = full
        if causal:
            flops /= 2
        (t_pt, t_ours), (c_pt, c_ours) = median_times(fns, args.rounds)
        print(f"{name:16s} sdpa {t_pt * 1e3:8.2f} ms ({flops / t_pt / 1e9:6.1f} GFLOP/s)  "
              f"ours {t_ours * 1e3:8.2f} ms ({flops / t_ours / 1e9:6.1f} GFLOP/s)  "
              f"ratio {t_pt / t_ours:5.2f}x   (cpu-time ratio {c_pt / c_ours:5.2f}x)")


if __name__ == "__main__":
    main()
