"""Triton flash attention launchers against fastattn.reference.attention.

Runs on CPU tensors with TRITON_INTERPRET=1 (or on a GPU). fp16/bf16 follow the 2x rule
(ref = fp32 reference, pt = reference in the input dtype); fp32 is tight. Shapes are small and
awkward (1, 7, 97, 129 rows; head dims 16, 40, 80, 128) so the file stays fast in the interpreter.
"""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.kernels._compat import interpreting

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastattn.kernels import attention as ta  # noqa: E402
from tolerances import (ATTENTION_FP32, ATTENTION_TRITON_SPLIT_VS_PLAIN, assert_max_err, bound_2x,
                        floor_for, max_err, max_relative_bound)

DEVICE = "cpu" if interpreting() else "cuda"


@pytest.fixture(autouse=True)
def bf16_round_to_nearest(monkeypatch):
    """Interpreter fault: its fp32 -> bf16 cast truncates where a GPU rounds to nearest even.
    Cast through torch while these tests run (harness fix; the kernels are unchanged)."""
    if not interpreting():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16),
                                            tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


# ----------------------------------------------------------------------------- helpers

def max_finite_error(name, out, ref):
    """Max |out - ref| off the infinities, which (lse of empty rows) must agree exactly."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf), f"{name}: infinities differ from the reference"
    assert torch.equal(out[inf], ref[inf]), f"{name}: infinities differ from the reference"
    return max_err(out.masked_fill(inf, 0), ref.masked_fill(inf, 0))


def assert_close(name, out, ref, pt, dtype):
    err = max_finite_error(name, out, ref)
    ref64 = ref.masked_fill(torch.isinf(ref), 0).double()
    if dtype == torch.float32:
        bound = max_relative_bound(ref64, **ATTENTION_FP32)
    else:
        pt64 = pt.masked_fill(torch.isinf(pt), 0).double()
        bound = bound_2x(pt64, ref64, floor_for(dtype))
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


def make_inputs(B, H, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    do = torch.randn(B, H, Sq, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def reference_grads(q, k, v, do, mask, dtype, **kw):
    """(out, lse, dq, dk, dv, dmask) of the reference run in `dtype` (mask grad if float)."""
    q, k, v, do = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, do))
    inputs = [q, k, v]
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().to(dtype).requires_grad_()
        inputs.append(mask)
    out, lse = reference.attention(q, k, v, mask=mask, return_lse=True, **kw)
    grads = torch.autograd.grad(out, inputs, do)
    dmask = grads[3] if len(grads) > 3 else None
    return out.detach(), lse.detach(), grads[0], grads[1], grads[2], dmask


def run_case(B, H, Hkv, Sq, Sk, D, dtype, mask_fn=None, **kw):
    q, k, v, do = make_inputs(B, H, Hkv, Sq, Sk, D, dtype)
    mask = mask_fn(B, H, Sq, Sk) if mask_fn is not None else None
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)                  # the kernel's mask; the fp32 ref upcasts it exactly
    kmask = mask
    mask_grad = mask is not None and mask.is_floating_point()
    kmask_full = kmask.expand(B, H, Sq, Sk) if kmask is not None else None

    out, lse = ta.attention_forward(q, k, v, mask=kmask_full, **kw)
    dq, dk, dv, dmask = ta.attention_backward(do, q, k, v, out, lse, mask=kmask_full,
                                              mask_needs_grad=mask_grad, **kw)
    ref = reference_grads(q, k, v, do, mask, torch.float32, **kw)
    pt = reference_grads(q, k, v, do, mask, dtype, **kw) if dtype != torch.float32 else ref
    mine = [out, lse, dq, dk, dv]
    if mask_grad:
        # the ops layer reduces dmask_full over broadcast dims; do the same here
        red = dmask.sum(dim=[i for i in range(4) if mask.shape[i] == 1], keepdim=True)
        mine.append(red)
    for name, a, r, p in zip(["out", "lse", "dq", "dk", "dv", "dmask"], mine, ref, pt):
        if name == "lse":
            assert a.dtype == torch.float32
            # lse is fp32 from the same inputs on both sides: tight
            assert_close(name, a, r, r, torch.float32)
        else:
            assert a.dtype == (dtype if name != "dmask" else torch.float32)
            assert_close(name, a, r, p, dtype)
    return out, lse, dq, dk, dv


def bcast_float_mask(B, H, Sq, Sk):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(B, 1, Sq, Sk, generator=g)
    m[:, :, :, ::5] = float("-inf")            # -inf entries count as masked
    return m.to(DEVICE)


def bool_mask_empty_rows(B, H, Sq, Sk):
    g = torch.Generator().manual_seed(2)
    m = torch.rand(B, H, Sq, Sk, generator=g) > 0.4
    m[:, :, 2] = False                         # a fully masked row
    return m.to(DEVICE)


def row_mask(B, H, Sq, Sk):                    # (Sq, Sk) broadcast over B and H
    g = torch.Generator().manual_seed(3)
    return (torch.rand(1, 1, Sq, Sk, generator=g) > 0.3).to(DEVICE)


# ----------------------------------------------------------------------------- parity

CASES = [
    # id, (B, H, Hkv, Sq, Sk, D), dtype, mask, keywords
    ("tiny-fp32", (1, 1, 1, 1, 7, 16), torch.float32, None, {}),
    ("fp16-causal-gqa-d40", (1, 4, 2, 97, 129, 40), torch.float16, None, dict(causal=True)),
    ("bf16-causal-br-d80", (1, 2, 2, 129, 97, 80), torch.bfloat16, None,
     dict(causal=True, alignment="bottom_right")),
    ("fp32-window-kl-d128", (2, 2, 1, 7, 97, 128), torch.float32, None,
     dict(window_left=20, window_right=3, alignment="bottom_right",
          key_lengths=torch.tensor([60, 97]))),
    ("fp16-floatmask-softcap", (2, 2, 2, 33, 47, 64), torch.float16, bcast_float_mask,
     dict(softcap=2.0, scale=0.3)),
    ("bf16-boolmask-mqa", (1, 3, 1, 20, 31, 16), torch.bfloat16, bool_mask_empty_rows, {}),
    ("fp32-causal-empty-rows", (1, 2, 1, 40, 17, 40), torch.float32, row_mask,
     dict(causal=True, alignment="bottom_right", softcap=3.0)),
    ("fp16-window-causal-tl", (1, 2, 1, 97, 97, 16), torch.float16, None,
     dict(causal=True, window_left=9)),
    # 20 fp16 values = 40 bytes per row: the launcher copies into 16-byte aligned rows
    ("fp16-d20-unaligned", (1, 2, 2, 9, 13, 20), torch.float16, None, {}),
]


@pytest.mark.parametrize("shape, dtype, mask_fn, kw", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_forward_backward_matches_reference(shape, dtype, mask_fn, kw):
    kw = dict(kw)
    if "key_lengths" in kw:
        kw["key_lengths"] = kw["key_lengths"].to(DEVICE)
    run_case(*shape, dtype, mask_fn=mask_fn, **kw)


def test_fully_masked_rows_are_zero_with_zero_grads():
    # batch 0 sees no key at all (key_lengths 0); bottom-right causal with Sq > Sk empties the
    # first Sq - Sk rows of batch 1
    B, H, Sq, Sk, D = 2, 2, 12, 5, 16
    q, k, v, do = make_inputs(B, H, H, Sq, Sk, D, torch.float32)
    kw = dict(causal=True, alignment="bottom_right",
              key_lengths=torch.tensor([0, Sk], device=DEVICE))
    out, lse = ta.attention_forward(q, k, v, **kw)
    dq, dk, dv, _ = ta.attention_backward(do, q, k, v, out, lse, **kw)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    empty = Sq - Sk
    assert torch.all(out[1, :, :empty] == 0) and torch.all(torch.isneginf(lse[1, :, :empty]))
    assert torch.all(dq[1, :, :empty] == 0)
    assert torch.isfinite(lse[1, :, empty:]).all()


def test_noncontiguous_inputs():
    # (B, S, H, D) storage viewed as (B, H, S, D), and a last dim that is not contiguous
    B, H, Sq, Sk, D = 1, 2, 19, 23, 16
    q, k, v, do = make_inputs(B, H, H, Sq, Sk, D, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = torch.stack([k, torch.zeros_like(k)], dim=-1)[..., 0]   # last-dim stride 2
    out, lse = ta.attention_forward(qt, kt, v, causal=True)
    ref = reference.attention(q, k, v, causal=True)
    assert_close("out", out, ref, ref, torch.float32)


# ----------------------------------------------------------------------------- determinism

def test_backward_is_bitwise_deterministic():
    B, H, Hkv, Sq, Sk, D = 1, 4, 2, 45, 70, 40
    q, k, v, do = make_inputs(B, H, Hkv, Sq, Sk, D, torch.float16)
    out, lse = ta.attention_forward(q, k, v, causal=True)
    first = ta.attention_backward(do, q, k, v, out, lse, causal=True, deterministic=True)
    second = ta.attention_backward(do, q, k, v, out, lse, causal=True, deterministic=False)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_dkdv_head_dim_split_matches_the_whole_head_dim(monkeypatch):
    """D_SPLIT = 2 (two programs per key block, each writing half the head-dim columns; what
    TF32 takes at d = 256 on sm_90) gives the dK, dV of the unsplit kernel. Head dim 80 puts
    padded columns (80..127) in the second program's half; every feature is on."""
    from fastattn.kernels import _attention_configs as cfg
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 21, 45, 80
    q, k, v, do = make_inputs(B, H, Hkv, Sq, Sk, D, torch.float32)
    mask = bcast_float_mask(B, H, Sq, Sk).expand(B, H, Sq, Sk)
    kw = dict(mask=mask, causal=True, alignment="bottom_right", window_left=30, softcap=2.5,
              key_lengths=torch.tensor([40, 45], device=DEVICE), dropout_p=0.2, seed=7)
    out, lse = ta.attention_forward(q, k, v, **kw)
    used = []

    def force(split):
        def d_split(*args, **kwargs):
            used.append(split)
            return split
        return d_split

    monkeypatch.setattr(cfg, "dkdv_d_split", force(2))
    _, dk2, dv2, _ = ta.attention_backward(do, q, k, v, out, lse, **kw)
    monkeypatch.setattr(cfg, "dkdv_d_split", force(1))
    _, dk1, dv1, _ = ta.attention_backward(do, q, k, v, out, lse, **kw)
    assert used == [2, 1]
    for name, a, b in (("dk", dk2, dk1), ("dv", dv2, dv1)):
        assert a.abs().max() > 0, name
        assert_close(name, a, b, b, torch.float32)


def test_dkdv_head_dim_split_choice():
    from fastattn.kernels import _attention_configs as cfg
    split = cfg.dkdv_d_split
    assert split(90, 256, 4, "tf32", interpret=False) == 2     # the one split GPU tile
    for case in ((80, 256, 4, "tf32"), (90, 256, 2, "tf32"), (90, 256, 4, "ieee"),
                 (90, 128, 4, "tf32")):
        assert split(*case, interpret=False) == 1, case
    # the interpreter splits from 64 columns on, so the parity tests run both code paths
    assert split(None, 64, 2, "tf32", interpret=True) == 2
    assert split(None, 32, 2, "tf32", interpret=True) == 1


# ----------------------------------------------------------------------------- dropout

def test_dropout_keep_mask_statistics_and_indexing():
    p = 0.25
    shape = (2, 3, 33, 70)
    keep = ta.dropout_keep_mask(shape, p, seed=1234, offset=0, device=DEVICE)
    assert keep.dtype == torch.bool and keep.shape == shape
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma
    # keyed by the linear element index + offset: shifting the offset by Sk shifts rows by one
    Sk = shape[-1]
    shifted = ta.dropout_keep_mask(shape, p, seed=1234, offset=Sk, device=DEVICE)
    assert torch.equal(shifted.flatten()[:-Sk], keep.flatten()[Sk:])
    other = ta.dropout_keep_mask(shape, p, seed=1235, offset=0, device=DEVICE)
    assert not torch.equal(other, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_forward_backward_match_reference_with_same_mask(dtype):
    B, H, Hkv, Sq, Sk, D = 1, 2, 1, 37, 45, 40
    p, seed, offset = 0.3, 77, 1000
    q, k, v, do = make_inputs(B, H, Hkv, Sq, Sk, D, dtype)
    kw = dict(causal=True, dropout_p=p, seed=seed, offset=offset)
    out, lse = ta.attention_forward(q, k, v, **kw)
    dq, dk, dv, _ = ta.attention_backward(do, q, k, v, out, lse, **kw)
    keep = ta.dropout_keep_mask((B, H, Sq, Sk), p, seed, offset, device=DEVICE)
    rkw = dict(causal=True, dropout_mask=keep, dropout_p=p)
    ref = reference_grads(q, k, v, do, None, torch.float32, **rkw)
    pt = reference_grads(q, k, v, do, None, dtype, **rkw) if dtype != torch.float32 else ref
    for name, a, r, pp in zip(["out", "lse", "dq", "dk", "dv"], [out, lse, dq, dk, dv], ref, pt):
        assert_close(name, a, r, r if name == "lse" else pp,
                     torch.float32 if name == "lse" else dtype)
    again, _ = ta.attention_forward(q, k, v, **kw)
    assert torch.equal(again, out)


# ----------------------------------------------------------------------------- decode

@pytest.mark.parametrize("Sq, H, Hkv, dtype, kw", [
    (1, 4, 1, torch.float32, dict(key_lengths=[0, 650])),     # batch 0: every row empty
    (5, 4, 2, torch.float16, dict(causal=True, alignment="bottom_right", softcap=4.0)),
    # 4 heads x 16 queries = 64 packed rows: two fp32 row blocks of 32
    (16, 4, 1, torch.float32, dict(window_left=200, key_lengths=[700, 530])),
], ids=["mqa-sq1", "gqa-causal-softcap-fp16", "sq16-window-kl"])
def test_decode_matches_plain_path_and_reference(monkeypatch, Sq, H, Hkv, dtype, kw):
    B, Sk, D = 2, 700, 40
    kw = dict(kw)
    if "key_lengths" in kw:
        kw["key_lengths"] = torch.tensor(kw["key_lengths"], device=DEVICE)
    q, k, v, _ = make_inputs(B, H, Hkv, Sq, Sk, D, dtype)
    mask = (torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(5)) > 0.1)
    mask = mask.to(DEVICE).expand(B, H, Sq, Sk)

    calls = []
    decode = ta._decode
    monkeypatch.setattr(ta, "_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    out, lse = ta.attention_forward(q, k, v, mask=mask, **kw)
    assert calls, "attention_forward did not route to the decode kernels"
    monkeypatch.setattr(ta, "DECODE_MIN_SK", 10 ** 9)
    plain_out, plain_lse = ta.attention_forward(q, k, v, mask=mask, **kw)
    assert len(calls) == 1
    split_out, split_lse = ta.attention_decode(q, k, v, mask=mask, num_splits=3, **kw)

    ref_out, ref_lse = reference.attention(q.float(), k.float(), v.float(), mask=mask,
                                           return_lse=True, **kw)
    pt_out = reference.attention(q, k, v, mask=mask, **kw)
    for o in (out, split_out):
        assert_close("decode out", o, ref_out, pt_out, dtype)
    # same result as the plain path (up to fp32 summation order)
    assert_max_err(out, plain_out, ATTENTION_TRITON_SPLIT_VS_PLAIN[dtype], "decode vs plain")
    for l in (lse, split_lse, plain_lse):
        assert_close("decode lse", l, ref_lse, ref_lse, torch.float32)


# ----------------------------------------------------------------------------- errors / capability

def test_bad_input_names_the_argument():
    # arguments are validated once, by the public function; the launchers only assert (and
    # `unsupported` turns away what the kernels cannot run, e.g. dropout on the decode path)
    q, k, v, _ = make_inputs(1, 4, 2, 8, 8, 16, torch.float32)
    sdpa = fastattn.scaled_dot_product_attention
    with fastattn.use_backend("triton"):
        with pytest.raises(ValueError, match="key head dim"):
            sdpa(q, k[:, :, :, :8], v, enable_gqa=True)
        with pytest.raises(ValueError, match="heads"):
            sdpa(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), enable_gqa=True)
        with pytest.raises(ValueError, match="causal_alignment"):
            sdpa(q, k, v, enable_gqa=True, causal_alignment="middle")
        with pytest.raises(ValueError, match="attn_mask"):
            sdpa(q, k, v, torch.zeros(3, 3, device=DEVICE), enable_gqa=True)
        with pytest.raises(ValueError, match="key_lengths"):
            sdpa(q, k, v, enable_gqa=True, key_lengths=torch.tensor([1.5], device=DEVICE))
        with pytest.raises(ValueError, match="dropout_p"):
            sdpa(q, k, v, dropout_p=1.0, enable_gqa=True)
        with pytest.raises(ValueError, match="query"):
            sdpa(q.int(), k, v, enable_gqa=True)


def test_unsupported_reasons():
    q, k, v, _ = make_inputs(1, 2, 2, 4, 4, 16, torch.float32)
    assert ta.unsupported("attention_forward", q=q, k=k, v=v, dropout_p=0.1) is None
    assert "dtype" in ta.unsupported("attention_forward", q=q.double(), k=k, v=v)
    big = torch.zeros(1, 1, 2, 320, device=DEVICE)
    assert "head dim" in ta.unsupported("attention_forward", q=big, k=big, v=big)
    assert ta.unsupported("attention_decode", q=q, k=k, v=v, dropout_p=0.2) is not None
    # the ops layer's description of a call
    case = dict(dtype=torch.float16, head_dim=80, v_head_dim=80, q_len=7, k_len=9, mask="float",
                mask_needs_grad=True, causal=True, alignment="bottom_right", window=True,
                softcap=1.0, key_lengths=True, dropout_p=0.1, gqa=True, deterministic=True,
                device=DEVICE)
    assert ta.unsupported("attention", **case) is None
    assert "v head dim" in ta.unsupported("attention", **dict(case, v_head_dim=64))
    assert "dtype" in ta.unsupported("attention", **dict(case, dtype=torch.float64))


def test_autotune_prune_respects_arch_and_lengths():
    import triton
    from fastattn.kernels import _attention_configs as cfg

    def tiles(arch, sq, sk, block_d=256):
        return set(cfg.prune_tiles("fwd", arch, block_d, 2, rows=sq, cols=sk))

    big80, big90 = tiles(80, 4096, 4096), tiles(90, 4096, 4096)
    assert big80 and big80 < big90            # sm_80 has less shared memory than sm_90
    for bm, bn, _, stages in big80:
        assert cfg.smem_estimate("fwd", bm, bn, 256, 2, stages) <= cfg.SMEM_LIMIT[80]
    assert all(bm <= 16 or bm == min(b for b, *_ in big90)
               for bm, *_ in tiles(90, 3, 4096))           # no 128-row tile for 3 queries
    configs = cfg.autotune_configs(cfg.prune_tiles("fwd", 90, 64, 2, rows=4096, cols=4096))
    assert isinstance(configs[0], triton.Config)


def test_autotune_prune_gives_tf32_its_own_tiles():
    # fp32 with TF32 dots spills on some IEEE tiles: the pruner must follow DOT_PREC (and the
    # arch), and the static report must list exactly the tiles the pruner can return
    from fastattn.kernels import _attention_configs as cfg
    listed = {arch: {(v.name, v.config) for v in ta.static_variants(arch)} for arch in (80, 90)}
    for kind, block_d in cfg.TF32_TABLE:
        name = {"fwd": "attention_fwd", "dkdv": "attention_bwd_dkdv",
                "dq": "attention_bwd_dq"}[kind]
        for arch in (80, 90):

            def tiles(prec):
                return set(cfg.prune_tiles(kind, arch, block_d, 4, prec, rows=1 << 16,
                                           cols=1 << 16))

            for prec, label in (("tf32", "tf32"), ("ieee", "fp32")):
                assert tiles(prec) == set(cfg.valid_configs(kind, arch, block_d, 4, prec))
                assert tiles(prec) <= set(cfg.table_tiles(kind, block_d, 4, prec, arch))
                split = cfg.dkdv_d_split(arch, block_d, 4, prec, interpret=False)
                ds = f" DS={split}" if kind == "dkdv" and split > 1 else ""
                for bm, bn, w, s in tiles(prec):
                    assert (name, f"{label} d={block_d} BM={bm} BN={bn}{ds} w={w} s={s}") \
                        in listed[arch]
            assert tiles("tf32") <= set(cfg.ARCH_TF32_TABLE.get((arch, kind, block_d),
                                                                cfg.TF32_TABLE[(kind, block_d)]))
    assert (32, 64, 8, 1) not in set(cfg.valid_configs("dkdv", 80, 64, 4, "tf32"))


def test_launch_autotuner_has_only_the_pruned_configs():
    """The GPU launch autotunes over the tiles pruned on the host: an autotuner with configs
    and key only (what torch.library.wrap_triton accepts), one per tile tuple."""
    from fastattn.kernels import _attention_configs as cfg
    from fastattn.kernels._attention_fwd import attn_fwd_kernel
    tiles = cfg.prune_tiles("fwd", 90, 64, 2, "tf32", rows=100, cols=4096)
    tuned = ta._tuned(attn_fwd_kernel, "fwd", tiles)
    assert ta._tuned(attn_fwd_kernel, "fwd", tiles) is tuned
    assert set(tuned.kwargs) == {"configs", "key"}
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in tuned.kwargs["configs"]] == list(tiles)
    assert all(bm <= 128 for bm, *_ in tiles)         # 100 rows: no tile above 128 rows


def test_sm90_tensor_core_tiles_have_a_64_row_mma():
    """wgmma (HGMMA) needs an MMA M of 64: queries for fwd/dq/decode, keys for dK/dV. Every
    sm_90 tile of a tensor-core dtype (fp16/bf16, TF32) must have it."""
    from fastattn.kernels import _attention_configs as cfg
    for elem, prec in ((2, "tf32"), (4, "tf32")):
        for block_d in (16, 32, 64, 128, 256):
            for kind in ("fwd", "dq", "dkdv"):
                for bm, bn, _, _ in cfg.valid_configs(kind, 90, block_d, elem, prec):
                    mma_m = bn if kind == "dkdv" else bm
                    assert mma_m % 64 == 0, (kind, elem, block_d, bm, bn)
                    assert cfg.uses_wgmma(kind, 90, bm, bn, elem, prec)
                    assert not cfg.uses_wgmma(kind, 80, bm, bn, elem, prec)
            for rows in (1, 3, 16, 40, 64):
                bm, *_ = cfg.decode_tiles(rows, 1, block_d, elem, interpret=False, prec=prec,
                                          arch=90)
                assert bm == 64, (elem, block_d, rows)
                bm80, *_ = cfg.decode_tiles(rows, 1, block_d, elem, interpret=False, prec=prec,
                                            arch=80)
                assert bm80 <= max(16, 1 << (rows - 1).bit_length())


def test_static_variants_cover_every_kernel():
    import inspect
    for arch in (80, 90):
        variants = ta.static_variants(arch)
        names = {s.name for s in variants}
        assert {"attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv",
                "attention_bwd_dq", "attention_decode_split", "attention_decode_merge"} <= names
        for s in variants:
            params = list(inspect.signature(s.kernel.fn).parameters)
            assert set(s.signature) == set(params), s.config
            assert {n for n, t in s.signature.items() if t == "constexpr"} == set(s.constexprs)
