"""Dev benchmark: fastattn._C CPU row-wise kernels vs PyTorch, side by side in one process.

Reports PyTorch time / ours (median of several interleaved rounds; > 1 means we are faster)
against the targets of the extension's issue. Usage: python benchmarks/_dev_rowwise_cpu.py
[--threads 2] [--rounds 7] [--rows 4096] [--only softmax,layer_norm,...]
(--rows 256 keeps the 1024-wide rows' input and output in the two cores' L2: the in-cache speed)
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastattn import _C_ops


def _time(fn, reps):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def _compare(name, ours, theirs, target, rounds, reps, nbytes):
    t_ours, t_theirs = [], []
    for _ in range(rounds):  # interleave so load changes hit both alike
        t_ours.append(_time(ours, reps))
        t_theirs.append(_time(theirs, reps))
    ratios = sorted(a / b for a, b in zip(t_theirs, t_ours))
    ratio = statistics.median(ratios)
    mo = statistics.median(t_ours)
    ok = "ok" if ratio >= target else "MISSED"
    print(f"{name:34s} ours {mo * 1e3:7.3f} ms ({nbytes / mo / 1e9:5.1f} GB/s)  torch "
          f"{statistics.median(t_theirs) * 1e3:7.3f} ms  ratio {ratio:5.2f} "
          f"[{ratios[0]:.2f}..{ratios[-1]:.2f}]  target {target:.1f} {ok}")
    return ratio


def rotate_half_formula(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))
    run = lambda n: not only or n in only  # noqa: E731
    r, n = args.rows, 1024
    x = torch.randn(r, n)
    w, b = torch.randn(n), torch.randn(n)
    nb = 2 * x.numel() * 4
    print(f"threads={args.threads} rounds={args.rounds} reps={args.reps} rows={r} x {n}")
    if run("softmax"):
        _compare(f"softmax {r}x{n} fp32", lambda: _C_ops.softmax_forward(
            x, scale=None, mask=None, causal=False), lambda: torch.softmax(x, -1), 1.5,
            args.rounds, args.reps, nb)
        y = torch.softmax(x, -1)
        dy = torch.randn_like(x)
        _compare(f"softmax bwd {r}x{n} fp32", lambda: _C_ops.softmax_backward(dy, y, scale=1.0),
                 lambda: torch.ops.aten._softmax_backward_data(dy, y, -1, torch.float32), 0.0,
                 args.rounds, args.reps, 3 * x.numel() * 4)
        xb = x.bfloat16()
        _compare(f"softmax {r}x{n} bf16", lambda: _C_ops.softmax_forward(
            xb, scale=None, mask=None, causal=False), lambda: torch.softmax(xb, -1), 0.0,
            args.rounds, args.reps, nb // 2)
    if run("layer_norm"):
        _compare(f"layer_norm {r}x{n} fp32", lambda: _C_ops.layer_norm_forward(
            x, w, b, 1e-5, None), lambda: F.layer_norm(x, (n,), w, b, 1e-5), 1.0,
            args.rounds, args.reps, nb)
    if run("rms_norm"):
        _compare(f"rms_norm {r}x{n} fp32", lambda: _C_ops.rms_norm_forward(x, w, 1e-5, None),
                 lambda: F.rms_norm(x, (n,), w, 1e-5), 2.0, args.rounds, args.reps, nb)
    if run("norm_backward"):
        _, mean, rstd, _ = _C_ops.layer_norm_forward(x, w, b, 1e-5, None)
        dy = torch.randn_like(x)
        xr = x.clone().requires_grad_()
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()

        def torch_ln_bwd():
            out = F.layer_norm(xr, (n,), wr, br, 1e-5)
            torch.autograd.grad(out, (xr, wr, br), dy)

        _compare(f"layer_norm fwd+bwd {r}x{n} fp32", lambda: (
            _C_ops.layer_norm_forward(x, w, b, 1e-5, None),
            _C_ops.layer_norm_backward(dy, x, w, b, mean, rstd, None)), torch_ln_bwd, 0.0,
            args.rounds, max(1, args.reps // 2), 3 * nb)
    if run("rotary"):
        q = torch.randn(4, 8, 512, 64)  # (B, H, S, D)
        cos, sin = torch.randn(512, 32), torch.randn(512, 32)
        cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        qs = q.transpose(1, 2)  # the (B, S, H, D) view the contract takes
        _compare("rotary (4,8,512,64) fp32", lambda: _C_ops.rotary_forward(
            qs, cos, sin, interleaved=False, offsets=None, conjugate=False),
            lambda: rotate_half_formula(q, cos_full, sin_full), 3.0, args.rounds, args.reps,
            2 * q.numel() * 4)


if __name__ == "__main__":
    main()
