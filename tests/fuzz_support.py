"""Shared pieces of the seeded random-configuration fuzz tests (tests/test_fuzz_*.py).

Convention shared by every fuzz file:
  configs per test  int(os.environ.get("FASTATTN_FUZZ_CONFIGS", <the test's default>))
  base seed         int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))
Config i of a test is drawn from random.Random(f"{test}:{seed}:{i}"), so a failure printed as
"seed=S config #i" reproduces with FASTATTN_FUZZ_SEED=S and at least i + 1 configs.
`make fuzz` runs every fuzz test with 1000 configs per test.

Each test compares a fastattn op with a float64 oracle written from the op's math in its own
test file (independent of fastattn/reference.py), outputs and gradients. Tolerances follow
DESIGN.md: fp16/bf16 max|out - ref| <= 2 * max|pt - ref| + floor, where pt is PyTorch's own
computation in the input dtype; fp32 is held to the same rule with a floor of a few fp32 ulps
of the reference's magnitude (tight: PyTorch's fp32 error is ~1e-7 relative). The constants
live in tests/tolerances.py.
"""

import os
import random

import pytest
import torch

import fastattn
from fastattn import _backend
from conftest import backend_device
from tolerances import FUZZ_FP32_REL_FLOOR, LOW_PRECISION, floor_for, max_err

FUZZ_BACKENDS = ("cpu", "torch", "triton", "cuda")


def num_configs(default):
    return int(os.environ.get("FASTATTN_FUZZ_CONFIGS", default))


def base_seed():
    return int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))


def config_rng(test, i):
    """(random.Random, torch.Generator) of config i of `test`."""
    seed = base_seed()
    rng = random.Random(f"{test}:{seed}:{i}")
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    return rng, gen


def require_backend(backend):
    """Skip GPU-only backends where they cannot run; cpu and torch must run (make test builds
    fastattn._C, so a missing cpu backend is a failure, not a skip)."""
    reason = _backend.unavailable_reason(backend, backend_device(backend))
    if reason is None:
        return
    if backend in ("cpu", "torch"):
        pytest.fail(f"backend {backend} unavailable: {reason}")
    pytest.skip(f"backend {backend} unavailable here: {reason}")


def pick_dtype(rng):
    return rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))


def strided_copy(t, rng, gen=None):
    """A non-contiguous tensor equal to t (same shape and values), in a random one of: dims
    permuted in storage, padding between rows (a sliced view), or contiguous. Leaf-ready."""
    if t.dim() == 0 or t.numel() == 0:
        return t.clone()
    kind = rng.choice(("contiguous", "permuted", "padded", "permuted_padded"))
    if kind == "contiguous":
        return t.clone()
    order = list(range(t.dim()))
    if "permuted" in kind:
        rng.shuffle(order)
    shape = [t.shape[d] for d in order]
    pad = [0] * t.dim()
    if "padded" in kind:
        pad[rng.randrange(t.dim())] = rng.choice((1, 3))
    storage = torch.full([s + p for s, p in zip(shape, pad)], float("nan"), dtype=t.dtype,
                         device=t.device)
    view = storage[tuple(slice(0, s) for s in shape)]          # padding stays NaN: never read
    inverse = [order.index(d) for d in range(t.dim())]
    view = view.permute(inverse)
    view.copy_(t)
    return view


def comparable(name, out, ref, failures):
    """Whether out can be held to a bound against ref: same shape, nonempty, finite (else a
    message in `failures` for a wrong shape or a non-finite value; empty tensors pass)."""
    if tuple(out.shape) != tuple(ref.shape):
        failures.append(f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return False
    if out.numel() == 0:
        return False
    if not torch.isfinite(out).all():
        failures.append(f"{name}: non-finite values ({(~torch.isfinite(out)).sum().item()})")
        return False
    return True


def check(name, out, ref, pt, cfg, failures, cond=1.0, scale=None):
    """Append a message to `failures` when out (kernel) misses the tolerance rule against ref
    (float64 oracle) and pt (PyTorch in the input dtype). `cond` (>= 1) scales the fp32 floor
    for an ill-conditioned case (LayerNorm of rows whose mean is far larger than their spread:
    h - mean cancels, and any fp32 implementation, PyTorch's included, loses |mean| / std
    ulps; PyTorch's own error can be lucky on one config, so 2 x pt alone is not a bound).
    `scale`: the magnitude of the terms that make up the value, when cancellation can make the
    value itself much smaller (default max|ref|)."""
    if out is None or ref is None:
        if (out is None) != (ref is None):
            failures.append(f"{name}: got {out is not None}, expected {ref is not None}")
        return
    if not comparable(name, out, ref, failures):
        return
    err = max_err(out, ref)
    pt_err = max_err(pt, ref)
    scale = max(ref.abs().max().item(), scale or 0.0)
    if out.dtype in LOW_PRECISION:
        bound = 2 * pt_err + floor_for(out.dtype)
    else:
        bound = 2 * pt_err + FUZZ_FP32_REL_FLOOR * max(1.0, scale) * cond
    if not err <= bound:
        failures.append(f"{name}: max err {err:.3g} > bound {bound:.3g} (pt err {pt_err:.3g}, "
                        f"max|ref| {scale:.3g})")


def run_fuzz(test, backend, n_default, one_config):
    """Run `one_config(rng, gen, device, cfg) -> failures` for each config (it records what it
    drew in the dict `cfg`, so a config that raises is printed too); fail with every failing
    config (up to 10) and the seed that reproduces them."""
    require_backend(backend)
    device = backend_device(backend)
    bad = []
    n = num_configs(n_default)
    with fastattn.use_backend(backend):
        for i in range(n):
            rng, gen = config_rng(test, i)
            cfg = {}
            try:
                failures = one_config(rng, gen, device, cfg)
            except Exception as exc:       # an exception in one config is a failure
                failures = [f"raised {type(exc).__name__}: {exc}"]
            if failures:
                bad.append(f"config #{i} {cfg}: " + "; ".join(failures))
    assert not bad, (f"{test} [{backend}]: {len(bad)} of {n} configs failed "
                     f"(FASTATTN_FUZZ_SEED={base_seed()}):\n" + "\n".join(bad[:10]))


# ------------------------------------------------- attention backward: rounding beyond `pt`

U_FP32 = 2.0 ** -24             # unit roundoff of the kernels' fp32 accumulation


def _per_kv_head(t, hkv):
    """(B, H, ...) summed over the query heads that share each kv head: (B, Hkv, ...)."""
    return t.reshape(t.shape[0], hkv, t.shape[1] // hkv, *t.shape[2:]).sum(2)


def attention_rounding(out, ref, lse, dout, p, q, k, v, scale, dropout_p, keep=None,
                       u=U_FP32):
    """What a flash backward's stored O and fp32 lse cost the gradients beyond `pt`, per
    gradient: {dmask, dq, dk, dv}, to add to the 2x rule's bound.

    out: the kernel's stored O, ref: the fp64 oracle's; lse (B, H, Sq); q, dout (B, H, Sq, D);
    k, v (B, Hkv, Sk, D) (GQA: query head h reads kv head h // (H / Hkv)); p (B, H, Sq, Sk):
    the exact softmax probabilities without dropout; keep: the dropout keep-mask
    (B, H, Sq, Sk) or None (then every key counts as kept); u: the unit roundoff of the
    backward's accumulation (fp32 for fp16/bf16/fp32 inputs).

    Autograd through the oracle (`pt`) never rounds O or lse, so where pt is nearly exact
    (one-hot rows, rows with one key: dS = P (dP - delta) cancels) the 2x rule alone misses
    what a flash backward adds (fp32 too: a scale of 50 turns O's last-bit rounding into 1e-3
    in dq). With D the head dim, gamma_D = D u bounds a length-D dot product's rounding
    relative to sum |x||y| (the standard bound), and drop_ij = keep_ij / (1 - dropout_p):
      delta_i = dO_i . O_i from the stored O (cpu, triton): off by
          e_i = sum_d |dO_id| |O_id - ref_id| + gamma_D sum_d |dO_id| |O_id|;
        or delta_i = sum_l P_il dP_il from the recomputed P (torch backend): off by
          f_i = sum_l P_il (gamma_D A_il drop_il + (Sk u + w_i) |dP_il|),
        with A_il = |dO_i| . |V_l| (dP's own rounding) and w_i below; a backend uses one of
        the two, so delta is off by at most max(e_i, f_i);
      dP_ij = dO_i . V_j drop_ij: off by gamma_D A_ij drop_ij;
      P_ij = exp(s_ij - lse_i) from the fp32 lse: off by a relative
        w_i = u32 (2 |lse_i| + 8): lse's rounding (u|lse|), the score's own fp32 rounding
        (u|s|, |s| ~ |lse| wherever P is not tiny), s - lse (u) and the exp (the CPU's
        exp_softmax: 3 ulp = 6u; +u for the scale folded into its argument);
    so dS_ij = P_ij (dP_ij - delta_i) is off by
      err_ij = P_ij (max(e_i, f_i) + gamma_D A_ij drop_ij) + w_i |dS_ij|   (dS exact),
    and the gradients by: dmask (= dS) max err; dq_i = scale sum_j dS_ij k_j by
    scale sum_j err_ij max|k_j|; dk_j = scale sum_i dS_ij q_i by scale sum_i err_ij max|q_i|
    (summed over the query heads of a kv head); dv_j = sum_i P_ij drop_ij dO_i by
    sum_i w_i P_ij drop_ij |dO_i|. (Softcap's factor 1 - tanh^2 <= 1 only shrinks dS.)
    At huge logits (|lse| ~ 1e3) the w terms are what the torch backend adds (attention config
    652: a window of two keys, dv 1.26e-4 against a bound of 9.9e-5 without them)."""
    h, hkv, sk, d = q.shape[1], k.shape[1], k.shape[2], dout.shape[-1]
    to_h = lambda t: t.detach().double().repeat_interleave(h // hkv, dim=1)   # (B, H, ...)
    p = p.detach().double()
    do = dout.detach().double()
    o = out.detach().double()
    lse64 = lse.detach().double()
    w = U_FP32 * (2.0 * lse64.abs().masked_fill(~torch.isfinite(lse64), 0.0) + 8.0)
    w = w.unsqueeze(-1)                                                       # (B,H,Sq,1)
    drop = torch.ones_like(p) if keep is None else keep.to(p.dtype).expand_as(p)
    drop = drop / (1.0 - dropout_p)                                           # (B,H,Sq,Sk)
    v_h = to_h(v)                                                             # (B,H,Sk,D)
    dp = torch.matmul(do, v_h.transpose(-2, -1)) * drop                       # exact dP
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))                            # exact dS
    dot_dp = d * u * torch.matmul(do.abs(), v_h.abs().transpose(-2, -1)) * drop
    e = (do.abs() * ((o - ref.detach().double()).abs() + d * u * o.abs())).sum(-1,
                                                                              keepdim=True)
    f = (p * (dot_dp + (sk * u + w) * dp.abs())).sum(-1, keepdim=True)
    err = p * (torch.maximum(e, f) + dot_dp) + w * ds.abs()                  # (B,H,Sq,Sk)
    err = err.masked_fill(~torch.isfinite(err), 0.0)
    kmax = to_h(k.abs().amax(-1)).unsqueeze(-2)                               # (B,H,1,Sk)
    qmax = q.detach().double().abs().amax(-1, keepdim=True)                   # (B,H,Sq,1)
    dq = scale * (err * kmax).sum(-1)
    dk = scale * _per_kv_head((err * qmax).sum(-2), hkv)
    dv = _per_kv_head(torch.matmul((p * drop * w).transpose(-2, -1), do.abs()), hkv)
    top = lambda t: t.max().item() if t.numel() else 0.0
    return {"dmask": top(err), "dq": top(dq), "dk": top(dk), "dv": top(dv)}


def visible(sq, sk, off, causal, wl, wr, device="cpu"):
    """Bool (Sq, Sk) of the oracles: the causal / window rules around the diagonal
    j = i + off (off = 0 top-left, Sk - Sq bottom-right)."""
    pos = torch.arange(sq, device=device).view(-1, 1) + off
    j = torch.arange(sk, device=device).view(1, -1)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= pos)
    if wl >= 0:
        vis = vis & (j >= pos - wl)
    if wr >= 0:
        vis = vis & (j <= pos + wr)
    return vis


def masked_softmax(s, vis):
    """(P, lse) of the oracles over the last dim of scores s where vis is True; a row with no
    visible key gives P = 0 and lse = -inf (never NaN). Differentiable in s."""
    s = s.masked_fill(~vis, float("-inf"))
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)           # empty rows: no NaN
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z == 0, torch.ones_like(z), z)
    zd = z.detach().squeeze(-1)
    lse = torch.where(zd == 0, torch.full_like(zd, float("-inf")),
                      m.squeeze(-1) + torch.log(torch.where(zd == 0, torch.ones_like(zd), zd)))
    return p, lse
