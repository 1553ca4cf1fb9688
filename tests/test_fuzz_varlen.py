"""Seeded random-configuration fuzz of fastattn.varlen_attention against the per-sequence
dense oracle (tests/varlen_support.py), outputs, lse and every gradient, on each backend.

Configurations: ragged batches with empty and single-token sequences, Sq != Sk per sequence
(both ways), GQA/MQA, odd head dims, causal and windows that empty rows or whole tiles,
softcap, dropout, strided (non-contiguous) views, huge logits and ALiBi slopes ((H,) or
(B, H)).

    FASTATTN_FUZZ_CONFIGS=200 FASTATTN_FUZZ_SEED=7 TRITON_INTERPRET=1 \\
        python -m pytest tests/test_fuzz_varlen.py

Each failure prints its configuration. Tolerance: the 2x rule for every dtype (the oracle in
the input dtype against the oracle in fp64, fp32 for low precision), with a floor relative to
the reference's magnitude.
"""

import math
import os
import random

import pytest
import torch

from conftest import TESTABLE_BACKENDS, backend_device
from fastattn import reference
from fuzz_support import U_FP32, attention_rounding
from tolerances import VARLEN_FUZZ_FLOOR, VARLEN_FUZZ_LSE_REL_FLOOR
from varlen_support import keep_mask, lse_matches, oracle, packed_inputs, run

CONFIGS = int(os.environ.get("FASTATTN_FUZZ_CONFIGS", "10"))
SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))
# the interpreter is ~100x slower: it runs every TRITON_EVERY-th configuration
TRITON_EVERY = 5


def _lengths(rng, b, top):
    out = []
    for _ in range(b):
        r = rng.random()
        out.append(0 if r < 0.15 else 1 if r < 0.3 else rng.randint(2, top))
    return out


def make_config(i):
    rng = random.Random(SEED * 100_003 + i)
    b = rng.randint(1, 5)
    top = rng.choice([9, 40, 70])
    lens_q = _lengths(rng, b, top)
    lens_k = lens_q if rng.random() < 0.4 else _lengths(rng, b, top)
    hkv = rng.choice([1, 2])
    cfg = dict(
        lens_q=lens_q, lens_k=lens_k, heads=hkv * rng.choice([1, 2, 3]), kv_heads=hkv,
        head_dim=rng.choice([16, 24, 40, 64, 80]),
        dtype=rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
        causal=rng.random() < 0.5,
        window=rng.choice([None, (rng.randint(0, 20), rng.choice([-1, 0, 3])),
                           (-1, rng.randint(0, 5)), (0, 0)]),
        softcap=rng.choice([0.0, 0.0, 7.0]),
        logit_scale=rng.choice([1.0, 1.0, 12.0]),          # 12: logits in the hundreds
        strided=rng.random() < 0.4,
        dropout_p=rng.choice([0.0, 0.0, 0.0, 0.3]),
    )
    low = cfg["dtype"] != torch.float32
    if low:
        # Dropout is fuzzed in fp32 only. delta = rowsum(dO * O) uses O rounded to the dtype
        # (as FlashAttention does); with dropout O = v / (1 - p) is not representable, and on
        # rows with one visible key the oracle's dS is exactly 0 while the kernels' dP - delta
        # keeps ulp(O) * |dO|, an error the 2x rule does not model (both the cpu and the torch
        # backends show it).
        cfg["dropout_p"] = 0.0
    if cfg["softcap"] == 0.0 and cfg["logit_scale"] > 1 and cfg["dtype"] != torch.float32:
        cfg["logit_scale"] = 3.0                           # fp16 overflows QK^T beyond this
    # the inputs' seed, drawn here so a printed config reproduces (it was hash(str(cfg)),
    # which Python randomises per process)
    cfg["data_seed"] = rng.randrange(2**31)
    cfg["alibi"] = rng.choice([None, None, None, "head", "batch"])   # drawn last: see above
    return cfg


def _alibi_slopes(cfg, device):
    """The config's ALiBi slopes (H,) or (B, H), or None (their own generator)."""
    if cfg.get("alibi") is None:
        return None
    g = torch.Generator().manual_seed(cfg["data_seed"] + 1)
    shape = (cfg["heads"],) if cfg["alibi"] == "head" else (len(cfg["lens_q"]), cfg["heads"])
    return (torch.rand(*shape, generator=g) * 0.6).to(device)


def _strided(t):
    """A non-contiguous view with t's values: rows padded past D, heads not adjacent."""
    buf = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 8, dtype=t.dtype, device=t.device)
    buf[..., :t.shape[2]] = t
    return buf[..., :t.shape[2]]


def _max_finite(t):
    f = torch.isfinite(t)
    return t[f].double().abs().max().item() if f.any() else 0.0


def _rounding_extras(inp, got, ref, keep, cfg, slopes=None):
    """Per gradient, the largest over sequences of what a flash backward's stored O and fp32
    lse cost beyond `pt` (fuzz_support.attention_rounding: delta = rowsum(dO * O) from the
    rounded O, dP's and delta's dot products, P = exp(s - lse) from the fp32 lse). Each sequence
    is its own dense attention (bottom-right aligned) in the (1, H, S, D) layout."""
    dtype = inp["q"].dtype
    scale = 1.0 / math.sqrt(inp["q"].shape[-1])
    window = cfg["window"] or (-1, -1)
    u = U_FP32 if dtype != torch.float64 else 2.0 ** -53      # the accumulation's roundoff
    cu_q, cu_k = inp["cu_q"].tolist(), inp["cu_k"].tolist()
    extras = {}
    for b in range(len(cu_q) - 1):
        qa, qe, ka, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qa or ke == ka:
            continue                                          # no keys: every gradient is 0
        seq = lambda t, a, e: t[a:e].transpose(0, 1).unsqueeze(0).detach()   # (1, H, S_b, D)
        q, k, v = seq(inp["q"], qa, qe), seq(inp["k"], ka, ke), seq(inp["v"], ka, ke)
        p = reference.attention_weights(q.double(), k.double(), scale=scale,
                                        causal=cfg["causal"], alignment="bottom_right",
                                        window_left=window[0], window_right=window[1],
                                        softcap=cfg["softcap"],
                                        alibi_slopes=None if slopes is None else
                                        slopes.expand(len(cu_q) - 1, -1)[b:b + 1].double())
                                                                  # (1, H, Sq_b, Sk_b)
        kb = None if keep is None else keep[b:b + 1, :, :qe - qa, :ke - ka]
        terms = attention_rounding(seq(got[0], qa, qe), seq(ref[0], qa, qe).double(),
                                   ref[1][:, qa:qe].unsqueeze(0), seq(inp["dout"], qa, qe),
                                   p, q, k, v, scale, cfg["dropout_p"], kb, u)
        for n, x in terms.items():
            extras[n] = max(extras.get(n, 0.0), x)
    return extras


def _check(name, got, ref, pt, dtype, cfg, lse_mag=1.0, extra=0.0):
    if name == "lse":                                      # -inf rows exact, else 2x rule
        fin = torch.isfinite(ref) & torch.isfinite(pt)
        pt_err = (pt[fin].double() - ref[fin].double()).abs().max().item() if fin.any() else 0
        lse_matches(got, ref, 2 * pt_err + VARLEN_FUZZ_LSE_REL_FLOOR * max(1.0, _max_finite(ref)))
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values; config {cfg}"
    if got.numel() == 0:
        return
    scale = max(1.0, ref.abs().max().item())
    err = (got.double() - ref.double()).abs().max().item()
    pt_err = (pt.double() - ref.double()).abs().max().item()
    if dtype == torch.float64:
        scale *= max(1.0, lse_mag)
    bound = 2 * pt_err + VARLEN_FUZZ_FLOOR[dtype] * scale + extra
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}; config {cfg}"


def run_config(backend, cfg):
    dtype = cfg["dtype"]
    inp = packed_inputs(cfg["lens_q"], cfg["lens_k"], cfg["heads"], cfg["kv_heads"],
                        cfg["head_dim"], dtype, backend_device(backend),
                        seed=cfg["data_seed"], scale=cfg["logit_scale"] ** 0.5)
    if cfg["strided"]:
        for n in "qkv":
            inp[n] = _strided(inp[n])
    slopes = _alibi_slopes(cfg, backend_device(backend))
    opts = dict(is_causal=cfg["causal"], window=cfg["window"], softcap=cfg["softcap"],
                dropout_p=cfg["dropout_p"], alibi_slopes=slopes)
    torch.manual_seed(11)
    got = run(inp, backend=backend, **opts)
    keep = None
    if cfg["dropout_p"] > 0:
        torch.manual_seed(11)
        seed, offset = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()
        keep = keep_mask(backend, inp, cfg["dropout_p"], seed, offset)
    window = cfg["window"] or (-1, -1)
    kw = dict(causal=cfg["causal"], window=window, softcap=cfg["softcap"], dropout_mask=keep,
              dropout_p=cfg["dropout_p"], alibi_slopes=slopes)
    # DESIGN.md: the reference in fp32 for fp16/bf16 (fp64 for fp32/fp64), `pt` in the dtype
    low = dtype in (torch.float16, torch.bfloat16)
    ref = oracle(inp, torch.float32 if low else torch.float64, **kw)
    pt = oracle(inp, dtype, **kw)
    extras = _rounding_extras(inp, got, ref, keep, cfg, slopes)
    for name, g, r, p in zip(("out", "lse", "dq", "dk", "dv"), got, ref, pt):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}; config {cfg}"
        _check(name, g, r, p, dtype, cfg, _max_finite(ref[1]), extras.get(name, 0.0))


def _params():
    out = []
    for i in range(CONFIGS):
        for backend in ("cpu", "torch", "triton"):
            if backend == "triton" and i % TRITON_EVERY:
                continue
            out.append((backend, i))
    return out


@pytest.mark.parametrize("backend,index", _params(),
                         ids=[f"{b}-{i}" for b, i in _params()])
def test_fuzz_varlen(backend, index):
    if backend not in TESTABLE_BACKENDS:
        pytest.skip(f"{backend} backend unavailable here")
    cfg = make_config(index)
    if backend == "torch" and cfg["dtype"] == torch.float32 and index % 2:
        cfg["dtype"] = torch.float64                      # the torch backend also takes fp64
    run_config(backend, cfg)
