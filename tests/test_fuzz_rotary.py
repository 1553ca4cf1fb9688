"""Seeded random-configuration fuzz of fastattn.apply_rotary / apply_rotary_qk against a
float64 oracle written from the math: outputs and input gradients, in place and out of place,
on every backend.

Random: rank 2-5, the sequence at any dim but the last (seq_dim positive or negative), head
dims 2-256 that are not powers of two, partial rotary dims, NeoX and GPT-J pairing, per-batch
offsets (int32/int64) into a longer cos/sin cache, fp32 or x-dtype tables (contiguous or
strided), strided/permuted/padded views (5-D ones whose head dims cannot be merged into one
view included: in place must still write into x), q and k with different head counts,
fp16/bf16/fp32.
Configs per test: $FASTATTN_FUZZ_CONFIGS (default below); base seed $FASTATTN_FUZZ_SEED
(tests/fuzz_support.py).
"""

import math

import pytest
import torch

from fuzz_support import (FUZZ_BACKENDS, check, pick_dtype, run_fuzz, strided_copy)

import fastattn

HEAD_DIMS = (2, 6, 16, 40, 64, 80, 96, 128, 256)
OTHER_SIZES = (1, 2, 3, 4, 5, 7, 8)
SEQ_LENS = (1, 2, 5, 7, 16, 33, 109)
DEFAULT_CONFIGS = {"cpu": 150, "torch": 60, "triton": 30, "cuda": 150}
MAX_ELEMENTS = {"cpu": 1 << 16, "torch": 1 << 15, "triton": 1 << 13, "cuda": 1 << 16}
MAX_TOKENS = {"cpu": 4096, "torch": 4096, "triton": 12, "cuda": 4096}     # B * S


def positions_table(table, x, seq, offsets):
    """table (S_cache, R/2) gathered at each token's position, shaped to broadcast against
    x[..., :R/2]: batch at dim 0 (1 when seq == 0), sequence at `seq`, 1 elsewhere."""
    nd, s_len = x.dim(), x.shape[seq]
    pos = torch.arange(s_len, device=x.device)
    if seq == 0:                                         # no batch dim: offsets has shape (1,)
        pos = pos + (int(offsets[0]) if offsets is not None else 0)
        return table[pos].view([s_len] + [1] * (nd - 2) + [table.shape[1]])
    b = x.shape[0]
    pos = pos[None, :] + (offsets.long()[:, None] if offsets is not None else 0)   # (B, S)
    pos = pos.expand(b, s_len)
    shape = [b] + [s_len if d == seq else 1 for d in range(1, nd - 1)] + [table.shape[1]]
    return table[pos.reshape(-1)].view(b, s_len, table.shape[1]).view(shape)


def rotary_math(x, cos, sin, interleaved, seq_dim, offsets):
    """Rotate the first R = 2 * cos.shape[1] features of x, in x's dtype (float64: oracle):
    pair (a, b) -> (a cos - b sin, a sin + b cos); NeoX pairs (k, k + R/2), GPT-J (2k, 2k+1)."""
    seq = seq_dim % x.dim()
    r2 = cos.shape[1]
    c = positions_table(cos.to(x.dtype), x, seq, offsets)
    s = positions_table(sin.to(x.dtype), x, seq, offsets)
    if interleaved:
        a, b = x[..., 0:2 * r2:2], x[..., 1:2 * r2:2]
    else:
        a, b = x[..., :r2], x[..., r2:2 * r2]
    ra, rb = a * c - b * s, a * s + b * c
    rot = torch.stack([ra, rb], -1).flatten(-2) if interleaved else torch.cat([ra, rb], -1)
    return torch.cat([rot, x[..., 2 * r2:]], -1)


def draw(rng, gen, device, backend, cfg):
    dtype = pick_dtype(rng)
    nd = rng.choice((2, 3, 4, 4, 4, 5, 5))
    d = rng.choice(HEAD_DIMS)
    shape = [rng.choice(OTHER_SIZES) for _ in range(nd - 1)] + [d]
    seq = rng.randrange(0, nd - 1)
    shape[seq] = rng.choice(SEQ_LENS)
    batch = shape[0] if seq > 0 else 1
    while (math.prod(shape) > MAX_ELEMENTS[backend]
           or batch * shape[seq] > MAX_TOKENS[backend]):
        shrinkable = [i for i in range(nd - 1) if shape[i] > 1]
        if not shrinkable:
            break
        i = rng.choice(shrinkable)
        shape[i] = max(1, shape[i] // 2)
        batch = shape[0] if seq > 0 else 1
    seq_dim = seq if rng.random() < 0.5 else seq - nd
    r2 = rng.choice((d // 2, d // 2, max(1, d // 4), 1, rng.randint(1, d // 2)))
    s_len = shape[seq]
    use_offsets = rng.random() < 0.4
    extra = rng.choice((0, 3, 50)) if use_offsets else rng.choice((0, 0, 4))
    offsets = None
    if use_offsets:
        offsets = torch.randint(0, extra + 1, (batch,), generator=gen)
        offsets = offsets.to(rng.choice((torch.int32, torch.int64))).to(device)
    table_dtype = rng.choice((torch.float32, dtype))
    base = rng.choice((10000.0, 500.0))
    cos, sin = fastattn.rotary_cache(s_len + extra, 2 * r2 * (2 if rng.random() < 0.2 else 1),
                                     base=base, device=device, dtype=table_dtype)
    if cos.shape[1] != r2:                              # strided tables: every other column
        cos, sin = cos[:, ::2], sin[:, ::2]
    x = (torch.randn(shape, generator=gen) * rng.choice((1.0, 4.0))).to(dtype).to(device)
    interleaved = rng.random() < 0.5
    mode = rng.choice(("out", "out", "inplace", "qk"))
    cfg.update(shape=tuple(shape), seq_dim=seq_dim, rot_dim=2 * r2,
               dtype=str(dtype).replace("torch.", ""),
               table_dtype=str(table_dtype).replace("torch.", ""),
               table_strided=not cos.is_contiguous(), interleaved=interleaved,
               offsets=None if offsets is None else offsets.tolist(), mode=mode)
    return x, cos, sin, interleaved, seq_dim, offsets, mode


def reversed_layout(t):
    """t's values in storage with every dim's stride order reversed (the issue's layout: the
    head dims of a 5-D tensor then cannot be merged into one view)."""
    out = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype, device=t.device)
    out = out.permute(*reversed(range(t.dim())))
    out.copy_(t)
    return out


def one_config(backend):
    def run(rng, gen, device, cfg):
        x, cos, sin, interleaved, seq_dim, offsets, mode = draw(rng, gen, device, backend, cfg)
        kw = dict(interleaved=interleaved, seq_dim=seq_dim, offsets=offsets)
        failures = []
        inputs = [x]
        if mode == "qk":
            # k: another head count in a dim that is neither batch, sequence nor features
            k_shape = list(x.shape)
            seq = seq_dim % x.dim()
            heads = [i for i in range(1, x.dim() - 1) if i != seq]
            if heads:
                k_shape[rng.choice(heads)] = rng.choice((1, 2, 3))
            inputs.append((torch.randn(k_shape, generator=gen) * 2).to(x.dtype).to(device))
        views = [reversed_layout(t) if rng.random() < 0.25 else strided_copy(t, rng)
                 for t in inputs]
        cfg["x_strides"] = views[0].stride()
        dys = [torch.randn(t.shape, generator=gen).to(x.dtype).to(device) for t in inputs]
        if mode == "inplace":
            target = views[0]
            with torch.no_grad():
                out = fastattn.apply_rotary(target, cos, sin, inplace=True, **kw)
            if out is not target:
                failures.append("inplace=True did not return x itself")
            outs, grads = [target], None
        else:
            leaves = [v.requires_grad_() for v in views]
            if mode == "qk":
                outs = list(fastattn.apply_rotary_qk(leaves[0], leaves[1], cos, sin, **kw))
            else:
                outs = [fastattn.apply_rotary(leaves[0], cos, sin, **kw)]
            grads = torch.autograd.grad(outs, leaves, dys)
        for name, dt in (("ref", torch.float64), ("pt", x.dtype)):
            lv = [t.detach().to(dt).requires_grad_() for t in inputs]
            o = [rotary_math(t, cos.to(torch.float64) if dt == torch.float64 else cos,
                             sin.to(torch.float64) if dt == torch.float64 else sin,
                             interleaved, seq_dim, offsets) for t in lv]
            g = torch.autograd.grad(o, lv, [dy.to(dt) for dy in dys])
            if name == "ref":
                ref_o, ref_g = o, g
            else:
                pt_o, pt_g = o, g
        for i, tensor_name in enumerate(("q" if mode == "qk" else "x", "k")[:len(inputs)]):
            check(f"out[{tensor_name}]", outs[i], ref_o[i], pt_o[i], cfg, failures)
            if grads is not None:
                check(f"d{tensor_name}", grads[i], ref_g[i], pt_g[i], cfg, failures)
        return failures
    return run


@pytest.mark.parametrize("backend", FUZZ_BACKENDS)
def test_fuzz_rotary(backend):
    run_fuzz("rotary", backend, DEFAULT_CONFIGS[backend], one_config(backend))
