"""Seeded random-configuration fuzz of attention (functional and MultiHeadAttention) against a
float64 oracle written here from the math of docs/backend-contract.md (independent of
fastattn/reference.py): outputs, lse, attention weights and every gradient (dq, dk, dv, float
mask), on the cpu, torch and triton (interpreter) backends.

Configs: odd sizes, head dims that are not powers of two, GQA, strided views, bool/float masks
with -inf entries and fully masked rows, windows that empty rows and whole tiles, causal in
both alignments, Sq != Sk, softcap, key_lengths (0 included), huge logits and scales, dropout
(keep-mask from the backend's own RNG for the call's seed), deterministic=True reruns, ALiBi
slopes ((H,) or (B, H); the oracle adds -slope * |i + shift - j| after softcap).

Bounds: fp32 against the fp64 oracle with tight absolute + relative bounds (for huge-logit
configs plus twice the fp32 oracle's own error: such logits are ill-conditioned); fp16/bf16 by the
2x rule of DESIGN.md: max|out - ref| <= 2 * max|pt - ref| + floor, with `ref` the oracle in
fp64 and `pt` the oracle in the input dtype (matmuls in the dtype, softmax in fp32, as
PyTorch's math attention runs); where that oracle itself overflows (fp16 gradients at scale
1e10) two ulps of the dtype relative to max|ref| instead. Every output must be finite (lse -inf exactly where the
oracle's is).

  FASTATTN_FUZZ_CONFIGS=N   configs per test (defaults below, sized for the 2-core CI)
  FASTATTN_FUZZ_SEED=S      base seed; config i is random.Random(S + i), printed on failure
"""

import math
import os
import random

import pytest
import torch

import fastattn
from fastattn import _backend
from conftest import TESTABLE_BACKENDS, backend_device
from fuzz_support import attention_rounding, masked_softmax, visible
from tolerances import (ATTENTION_FP32, ATTENTION_FUZZ_LSE, EPS, bound_2x, floor_for, max_err,
                        max_relative_bound)

SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))


def n_configs(default):
    return int(os.environ.get("FASTATTN_FUZZ_CONFIGS", default))


# Defaults: a few hundred configs on the C++ kernels, fewer on the torch backend (it
# materialises the scores) and a handful of small ones on the slow Triton interpreter.
DEFAULTS = {"cpu": 100, "torch": 40, "triton": 6, "cuda": 40}

# ------------------------------------------------------------------------------------ oracle


def oracle(q, k, v, *, mask, scale, causal, bottom_right, wl, wr, softcap, key_lengths,
           keep, dropout_p, fp64, alibi=None):
    """out (B, H, Sq, D), lse (B, H, Sq), P (B, H, Sq, Sk), differentiable.

    fp64=True: everything in float64 (the reference). fp64=False: q k^T and P v in the input
    dtype, the softmax in fp32 (PyTorch's math attention in low precision)."""
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    heads = torch.arange(h, device=q.device) // (h // hkv)
    kk, vv = k[:, heads], v[:, heads]                                   # (B, H, Sk, D)
    if fp64:
        q, kk, vv = q.double(), kk.double(), vv.double()
    s = torch.matmul(q, kk.transpose(-2, -1))
    s = s.double() if fp64 else s.float()
    s = s * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = sk - sq if bottom_right else 0                   # the diagonal j = i + off
    if alibi is not None:                                  # (H,) or (B, H) slopes
        i = torch.arange(sq, device=q.device).view(sq, 1)
        j = torch.arange(sk, device=q.device).view(1, sk)
        dist = (i + off - j).abs().to(s.dtype)
        s = s - alibi.to(s.dtype).expand(b, h)[:, :, None, None] * dist
    vis = visible(sq, sk, off, causal, wl, wr, q.device).expand(b, h, sq, sk)
    if key_lengths is not None:
        j = torch.arange(sk, device=q.device).view(1, 1, 1, sk)
        vis = vis & (j < key_lengths.view(b, 1, 1, 1).to(q.device))
    if mask is not None:
        if mask.dtype == torch.bool:
            vis = vis & mask
        else:
            s = s + mask.to(s.dtype)
    p, lse = masked_softmax(s, vis)
    pd = p if keep is None else p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(pd if fp64 else pd.to(vv.dtype), vv)
    return out, lse, p


# ------------------------------------------------------------------------------------ checks


def check_close(name, got, ref, pt, cfg, extra=0.0):
    """fp32: tight bounds against the fp64 oracle; fp16/bf16: the 2x rule (+ `extra`)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}\n{cfg}"
    assert torch.isfinite(got).all(), f"{name}: NaN/inf in the result\n{cfg}"
    err = max_err(got, ref)
    if got.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(pt).all():
        # The dtype-precision oracle itself overflows (fp16 gradients at scale 1e10): no 2x
        # rule to apply; allow two ulps of the dtype relative to the result instead.
        bound = max_relative_bound(ref, floor_for(got.dtype), 2 * EPS[got.dtype])
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}\n{cfg}"
    elif got.dtype in (torch.float16, torch.bfloat16):
        bound = bound_2x(pt, ref, floor_for(got.dtype)) + extra
        assert err <= bound, (f"{name}: max error {err:.3g} > 2 x {max_err(pt, ref):.3g} + "
                              f"{floor_for(got.dtype)} + {extra:.3g}\n{cfg}")
    else:
        # tight, plus twice the fp32 oracle's own error: logits of hundreds (huge configs)
        # are ill-conditioned in fp32 whoever computes them
        own = max_err(pt, ref) if pt is not ref else 0.0
        bound = max_relative_bound(ref, **ATTENTION_FP32) + 2 * own + extra
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}\n{cfg}"


def check_lse(got, ref, cfg):
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"lse: -inf rows differ\n{cfg}"
    fin = torch.isfinite(ref)
    assert torch.isfinite(got[fin]).all() and not torch.isnan(got).any() \
        and not torch.isposinf(got).any(), f"lse: NaN/+inf\n{cfg}"
    if fin.any():
        r = ref[fin]
        err = max_err(got[fin], r)
        bound = max_relative_bound(r, **ATTENTION_FUZZ_LSE)
        assert err <= bound, f"lse: max error {err:.3g} > {bound:.3g}\n{cfg}"


# ------------------------------------------------------------------------------ configs


def _strided(t, rng, gen):
    """The same values in a non-contiguous layout (padded head dim, sequence-major storage,
    or a stride over a larger buffer), chosen at random."""
    kind = rng.choice(["contiguous", "padded", "seq_major", "every_other"])
    b, h, s, d = t.shape
    if kind == "padded":                                  # rows longer than D
        buf = torch.randn(b, h, s, d + 3, generator=gen).to(t.dtype)
        buf[..., :d] = t
        return buf[..., :d]
    if kind == "seq_major":                               # (B, S, H, D) storage
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "every_other":                             # stride 2 over the sequence
        buf = torch.randn(b, h, 2 * s, d, generator=gen).to(t.dtype)
        buf[:, :, ::2] = t
        return buf[:, :, ::2]
    return t


def _length(rng, small):
    if small:
        return rng.choice([1, 2, 7, 17, 33, rng.randint(1, 40)])
    return rng.choice([1, 7, 64, 97, 129, 130, rng.randint(1, 200), rng.randint(1, 600)])


def make_config(i, small=False):
    rng = random.Random(SEED + i)
    cfg = dict(seed=SEED + i)
    cfg["dtype"] = rng.choice(["float32", "float16", "bfloat16"])
    cfg["B"] = rng.choice([1, 1, 2, 3])
    hkv = rng.choice([1, 1, 2, 3])
    cfg["Hkv"] = hkv
    cfg["H"] = hkv * rng.choice([1, 1, 2, 4])
    cfg["Sq"], cfg["Sk"] = _length(rng, small), _length(rng, small)
    if rng.random() < 0.2:
        cfg["Sk"] = cfg["Sq"]
    dims = [16, 24, 40, 64] if small else [8, 16, 40, 64, 72, 80, 96, 128, 160]
    cfg["D"] = rng.choice(dims)
    cfg["causal"] = rng.random() < 0.35
    cfg["bottom_right"] = rng.random() < 0.5
    w = rng.random()
    if w < 0.45:
        cfg["window"] = None
    else:
        # small left windows with Sq > Sk leave trailing rows (and whole query tiles) with no key
        left = rng.choice([-1, 0, 1, 3, 31, rng.randint(0, 80)])
        right = rng.choice([-1, 0, 1, 7, rng.randint(0, 80)])
        cfg["window"] = (left, right)
    cfg["softcap"] = rng.choice([0.0, 0.0, 0.0, 5.0, 30.0, 50.0])
    cfg["mask"] = rng.choice([None, None, "bool", "float"])
    cfg["mask_shape"] = rng.choice(["SqSk", "11SqSk", "B11Sk", "HSqSk", "BHSqSk"])
    cfg["mask_grad"] = cfg["mask"] == "float" and rng.random() < 0.5
    cfg["key_lengths"] = rng.random() < 0.25
    cfg["huge"] = rng.choice([None] * 8 + ["logits", "scale"])
    cfg["dropout_p"] = rng.choice([0.0] * 7 + [0.1, 0.3])
    cfg["deterministic"] = rng.random() < 0.2
    cfg["layouts"] = rng.getrandbits(30)
    if cfg["dropout_p"] > 0 and cfg["dtype"] != "float32" and cfg["huge"] == "logits":
        # Not checkable by the 2x rule: with one-hot rows and dropout the exact gradient is 0
        # and autograd's `pt` gets it exactly, while every flash backward (cpu, triton, torch)
        # forms delta = rowsum(dO * O) from the stored, rounded O, and 12x inputs amplify
        # that rounding past the floor. Covered in fp32 and without dropout instead.
        cfg["huge"] = None
    cfg["alibi"] = rng.choice([None, None, None, "head", "batch"])   # drawn last: see above
    return cfg


def make_inputs(cfg, device):
    """(q, k, v, mask, key_lengths, dout, scale) for cfg, on `device`, leaves."""
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    rng = random.Random(cfg["layouts"])
    b, h, hkv, sq, sk, d = cfg["B"], cfg["H"], cfg["Hkv"], cfg["Sq"], cfg["Sk"], cfg["D"]
    q = torch.randn(b, h, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    scale = 1.0 / math.sqrt(d)
    if cfg["huge"] == "logits":                  # logits of several hundred: one-hot rows
        q, k = q * 12.0, k * 12.0
    elif cfg["huge"] == "scale":
        scale = 1e10 if cfg["dropout_p"] == 0 and cfg["mask"] != "float" else 50.0
    q, k, v = (_strided(t.to(dtype), rng, gen) for t in (q, k, v))
    mask = None
    if cfg["mask"] is not None:
        shape = {"SqSk": (sq, sk), "11SqSk": (1, 1, sq, sk), "B11Sk": (b, 1, 1, sk),
                 "HSqSk": (h, sq, sk), "BHSqSk": (b, h, sq, sk)}[cfg["mask_shape"]]
        hide = torch.rand(shape, generator=gen) < 0.3
        if len(shape) >= 2 and shape[-2] > 1:    # a few fully masked rows
            rows = torch.rand(shape[:-1], generator=gen) < 0.1
            hide = hide | rows.unsqueeze(-1)
        if cfg["mask"] == "bool":
            mask = ~hide
        else:
            mask = (torch.randn(shape, generator=gen) * 2).masked_fill(hide, float("-inf"))
            mask = mask.to(dtype)
    key_lengths = None
    if cfg["key_lengths"]:
        key_lengths = torch.randint(0, sk + 1, (b,), generator=gen)
        key_lengths[torch.rand(b, generator=gen) < 0.3] = rng.choice([0, sk])
    dout = torch.randn(b, h, sq, d, generator=gen).to(dtype)
    alibi = None
    if cfg.get("alibi") is not None:                      # own generator: other draws unchanged
        g2 = torch.Generator().manual_seed(cfg["seed"] + 7)
        alibi = (torch.rand(*((h,) if cfg["alibi"] == "head" else (b, h)), generator=g2)
                 * 0.6).to(device)
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    if mask is not None:
        mask = mask.to(device)
        if cfg["mask_grad"]:
            mask.requires_grad_()
    if key_lengths is not None:
        key_lengths = key_lengths.to(device)
    return q, k, v, mask, key_lengths, dout.to(device), scale, alibi


def _grads(out, dout, leaves):
    ts = [t for t in leaves if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, ts, dout, allow_unused=True)
    it = iter(gs)
    return [None if t is None or not t.requires_grad else next(it) for t in leaves]


def _rng_pair(call_seed):
    """The (seed, offset) that fastattn's functional API draws after torch.manual_seed."""
    torch.manual_seed(call_seed)
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()


# ---------------------------------------------------------------------- functional fuzz


def run_functional(cfg, backend):
    device = backend_device(backend)
    q, k, v, mask, key_lengths, dout, scale, alibi = make_inputs(cfg, device)
    wl, wr = cfg["window"] if cfg["window"] is not None else (-1, -1)
    p = cfg["dropout_p"]
    kw = dict(attn_mask=mask, dropout_p=p, is_causal=cfg["causal"], scale=scale,
              enable_gqa=cfg["H"] != cfg["Hkv"], window=cfg["window"],
              softcap=cfg["softcap"], key_lengths=key_lengths, return_lse=True,
              causal_alignment="bottom_right" if cfg["bottom_right"] else "top_left",
              deterministic=cfg["deterministic"], alibi_slopes=alibi)
    call_seed = cfg["seed"] * 7 + 1

    def call():
        torch.manual_seed(call_seed)
        with fastattn.use_backend(backend):
            out, lse = fastattn.scaled_dot_product_attention(q, k, v, **kw)
        return (out, lse, *_grads(out, dout, [q, k, v, mask]))

    out, lse, dq, dk, dv, dmask = call()
    keep = None
    if p > 0:
        seed, offset = _rng_pair(call_seed)
        mod = _backend.backend_module(backend, "attention")
        keep = mod.dropout_keep_mask((cfg["B"], cfg["H"], cfg["Sq"], cfg["Sk"]), p, seed,
                                     offset, device)
    okw = dict(scale=scale, causal=cfg["causal"], bottom_right=cfg["bottom_right"], wl=wl,
               wr=wr, softcap=cfg["softcap"], key_lengths=key_lengths, keep=keep, dropout_p=p,
               alibi=alibi)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None
                and t.is_floating_point() else t for t in (q, k, v, mask)]
    ref, ref_lse, ref_p = oracle(*leaves64[:3], mask=leaves64[3], fp64=True, **okw)
    ref_g = _grads(ref, dout.double(), leaves64)
    low = out.dtype in (torch.float16, torch.bfloat16)
    if low or cfg["huge"] is not None:
        leaves_pt = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None
                     and t.is_floating_point() else t for t in (q, k, v, mask)]
        pt, _, _ = oracle(*leaves_pt[:3], mask=leaves_pt[3], fp64=False, **okw)
        pt_g = _grads(pt, dout, leaves_pt)
    else:
        pt, pt_g = ref, ref_g
    text = f"backend={backend} config={cfg}"
    check_close("out", out, ref, pt, text)
    check_lse(lse, ref_lse, text)
    # what the stored O and lse cost a flash backward beyond `pt` (fuzz_support)
    extras = attention_rounding(out, ref, ref_lse, dout, ref_p, q, k, v, scale, p, keep)
    for name, g, rg, pg in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask), ref_g, pt_g):
        if rg is None:
            continue
        check_close(name, g, rg, pg, text, extras.get(name, 0.0))
    if cfg["deterministic"]:
        again = call()
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dmask"),
                              (out, lse, dq, dk, dv, dmask), again):
            if a is not None:
                assert torch.equal(a, b), f"deterministic=True: {name} differs on rerun\n{text}"


FUZZ_BACKENDS = [b for b in TESTABLE_BACKENDS]


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_attention(backend):
    small = backend == "triton" and backend_device(backend) == "cpu"
    for i in range(n_configs(DEFAULTS[backend])):
        run_functional(make_config(i, small=small), backend)


# ----------------------------------------------------------------------------- module fuzz


def make_mha_config(i):
    rng = random.Random(SEED + 100_000 + i)
    cfg = dict(seed=SEED + 100_000 + i)
    cfg["dtype"] = rng.choice(["float32", "float16", "bfloat16"])
    cfg["H"] = rng.choice([1, 2, 3, 4])
    cfg["E"] = cfg["H"] * rng.choice([8, 16, 24, 40])
    cfg["kv_heads"] = rng.choice([None, None, 1]) if cfg["H"] > 1 else None
    cfg["N"] = rng.choice([1, 2, 3])
    cfg["L"] = rng.choice([1, 7, 49, rng.randint(1, 130)])
    cfg["S"] = rng.choice([1, 8, 49, rng.randint(1, 130)])
    cfg["batch_first"] = rng.random() < 0.5
    cfg["window"] = rng.choice([None, None, (0, -1), (7, 0), (3, 3), (rng.randint(0, 40), -1)])
    cfg["self_attn"] = rng.random() < 0.3
    cfg["key_is_value"] = rng.random() < 0.5
    cfg["kpm"] = rng.choice([None, "bool", "float", "right_pad"])
    cfg["attn_mask"] = rng.choice([None, "bool2d", "float2d", "bool3d", "float3d"])
    cfg["need_weights"] = rng.random() < 0.6
    cfg["average"] = rng.random() < 0.5
    return cfg


def mha_oracle(mod, query, key, value, kpm, attn_mask, fp64, window):
    """nn.MultiheadAttention's math with the module's parameters: (out, weights (N,H,L,S))."""
    h, e = mod.num_heads, mod.embed_dim
    hkv, d = mod.num_kv_heads, mod.head_dim
    w, bias = mod.in_proj_weight, mod.in_proj_bias
    cast = (lambda t: t.double()) if fp64 else (lambda t: t)
    if not mod.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    x_q, x_k, x_v, w, bias = cast(query), cast(key), cast(value), cast(w), cast(bias)
    kv = hkv * d
    q = torch.nn.functional.linear(x_q, w[:e], bias[:e])
    k = torch.nn.functional.linear(x_k, w[e:e + kv], bias[e:e + kv])
    v = torch.nn.functional.linear(x_v, w[e + kv:], bias[e + kv:])
    n, l_, s_ = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(n, l_, h, d).transpose(1, 2)
    k = k.view(n, s_, hkv, d).transpose(1, 2)
    v = v.view(n, s_, hkv, d).transpose(1, 2)
    mask = None
    float_mask = None
    if kpm is not None:
        if kpm.dtype == torch.bool:
            mask = ~kpm.view(n, 1, 1, s_)
        else:
            float_mask = kpm.view(n, 1, 1, s_)
    if attn_mask is not None:
        am = attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, h, l_, s_)
        if am.dtype == torch.bool:
            mask = ~am if mask is None else mask & ~am
        else:
            float_mask = am if float_mask is None else float_mask + am
    if mask is not None and float_mask is not None:
        float_mask = float_mask.masked_fill(~mask, float("-inf"))
        mask = None
    combined = mask if mask is not None else float_mask
    wl, wr = window if window is not None else (-1, -1)
    out, _, p = oracle(q, k, v, mask=combined, scale=1.0 / math.sqrt(d), causal=False,
                       bottom_right=False, wl=wl, wr=wr, softcap=0.0, key_lengths=None,
                       keep=None, dropout_p=0.0, fp64=fp64)
    out = out.transpose(1, 2).reshape(n, l_, e)
    ow, ob = cast(mod.out_proj.weight), cast(mod.out_proj.bias)
    out = torch.nn.functional.linear(out if fp64 else out.to(ow.dtype), ow, ob)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    return out, p


def run_mha(cfg, backend):
    device = backend_device(backend)
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    mod = fastattn.MultiHeadAttention(cfg["E"], cfg["H"], batch_first=cfg["batch_first"],
                                      num_kv_heads=cfg["kv_heads"], window=cfg["window"])
    mod = mod.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(cfg["seed"])
    n, l_, s_, e, h = cfg["N"], cfg["L"], cfg["S"], cfg["E"], cfg["H"]
    if cfg["self_attn"]:
        s_ = l_
    shape_q = (n, l_, e) if cfg["batch_first"] else (l_, n, e)
    shape_k = (n, s_, e) if cfg["batch_first"] else (s_, n, e)
    query = torch.randn(shape_q, generator=gen).to(device, dtype).requires_grad_()
    key = query if cfg["self_attn"] else \
        torch.randn(shape_k, generator=gen).to(device, dtype).requires_grad_()
    value = key if cfg["key_is_value"] or cfg["self_attn"] else \
        torch.randn(shape_k, generator=gen).to(device, dtype).requires_grad_()
    kpm = None
    if cfg["kpm"] == "bool":
        kpm = torch.rand(n, s_, generator=gen) < 0.3
    elif cfg["kpm"] == "right_pad":
        lens = torch.randint(0, s_ + 1, (n,), generator=gen)
        kpm = torch.arange(s_).unsqueeze(0) >= lens.unsqueeze(1)
    elif cfg["kpm"] == "float":
        kpm = (torch.randn(n, s_, generator=gen)).masked_fill(
            torch.rand(n, s_, generator=gen) < 0.2, float("-inf")).to(dtype)
    am = None
    kind = cfg["attn_mask"]
    if kind is not None:
        shape = (l_, s_) if kind.endswith("2d") else (n * h, l_, s_)
        hide = torch.rand(shape, generator=gen) < 0.3
        am = hide if kind.startswith("bool") else \
            torch.randn(shape, generator=gen).masked_fill(hide, float("-inf")).to(dtype)
    kpm = None if kpm is None else kpm.to(device)
    am = None if am is None else am.to(device)

    with fastattn.use_backend(backend):
        out, weights = mod(query, key, value, key_padding_mask=kpm, attn_mask=am,
                           need_weights=cfg["need_weights"],
                           average_attn_weights=cfg["average"])
    leaves = list(dict.fromkeys([query, key, value])) + [mod.in_proj_weight]
    dout = torch.randn(out.shape, generator=gen).to(device, dtype)
    got_g = torch.autograd.grad(out, leaves, dout)

    def ref_run(fp64):
        mapping = {id(t): (t.detach().double() if fp64 else t.detach().clone()).requires_grad_()
                   for t in leaves}
        q_, k_, v_ = (mapping[id(t)] for t in (query, key, value))
        w_saved = mod.in_proj_weight
        o, p = _with_weight(mod, mapping[id(w_saved)],
                            lambda: mha_oracle(mod, q_, k_, v_, kpm, am, fp64, cfg["window"]))
        g = torch.autograd.grad(o, [mapping[id(t)] for t in leaves],
                                dout.double() if fp64 else dout)
        return o, p, g

    ref, ref_p, ref_g = ref_run(True)
    low = dtype in (torch.float16, torch.bfloat16)
    pt, pt_p, pt_g = ref_run(False) if low else (ref, ref_p, ref_g)
    text = f"backend={backend} mha config={cfg}"
    check_close("mha out", out, ref, pt, text)
    for idx, (g, rg, pg) in enumerate(zip(got_g, ref_g, pt_g)):
        check_close(f"mha grad[{idx}]", g, rg, pg, text)
    if cfg["need_weights"]:
        rw = ref_p.mean(1) if cfg["average"] else ref_p
        pw = pt_p.mean(1) if cfg["average"] else pt_p
        check_close("mha weights", weights, rw, pw.to(dtype) if low else pw, text)
    else:
        assert weights is None


def _with_weight(mod, weight, fn):
    """Run fn with mod.in_proj_weight temporarily replaced by `weight` (a fresh leaf)."""
    saved = mod._parameters["in_proj_weight"]
    mod._parameters["in_proj_weight"] = weight
    try:
        return fn()
    finally:
        mod._parameters["in_proj_weight"] = saved


MHA_DEFAULTS = {"cpu": 30, "torch": 15, "triton": 3, "cuda": 20}


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_multihead_attention(backend):
    for i in range(n_configs(MHA_DEFAULTS[backend])):
        run_mha(make_mha_config(i), backend)
