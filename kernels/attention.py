"""Triton flash attention: launchers for the forward, backward and decode kernels.

Implements the "Attention" section of docs/backend-contract.md:

    attention_forward(q, k, v, *, mask, scale, causal, alignment, window_left, window_right,
                      softcap, key_lengths, dropout_p, seed, offset, alibi_slopes=None)
        -> (out, lse)
    attention_backward(dout, q, k, v, out, lse, *, <same keywords>, deterministic,
                       mask_needs_grad) -> (dq, dk, dv, dmask_full | None)
    attention_decode(q, k, v, *, <forward keywords>, num_splits=None) -> (out, lse)
    unsupported(op, **case) -> str | None

The backward never uses atomics (dK/dV of a kv head are summed over its query heads inside one
program), so it is always bitwise deterministic and `deterministic` changes nothing.
Any strides are accepted; the kernels always see 16-byte aligned rows (inputs whose rows are
not, e.g. fp16 head dim 20 or a strided last dim, are copied into zero-padded rows first).
Dropout: `dropout_keep_mask(shape, p, seed, offset)` materialises the kernels' keep-mask.
Kernels live in _attention_fwd.py, _attention_bwd.py, _attention_decode.py; tiles in
_attention_configs.py; the static-report list in _attention_static.py.
"""

import math

import torch
import triton

from . import _attention_configs as cfg
from . import _compat
from ._attention_configs import decode_tiles
from ._attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ._attention_common import dropout_mask_kernel
from ._attention_decode import attn_decode_split_kernel, merge_split_partials, split_chunks
from ._attention_fwd import attn_fwd_kernel
from ._compat import interpreting, launch
from ._support import device_reason

# attention_forward takes the split-K decode path from here on (dropout off)
DECODE_MAX_SQ = 16
DECODE_MIN_SK = 512
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)   # sm_80: bf16 tensor cores, the smallest arch the tiles are sized for

# autotune keys: exact lengths (as Triton's own tutorials) plus every flag that changes the code
_FLAGS = ["D", "ALIGNED", "DOT_PREC", "IS_CAUSAL", "HAS_WL", "HAS_WR", "MASK_KIND", "HAS_KL",
          "HAS_SOFTCAP", "HAS_DROPOUT", "VARLEN", "HAS_ALIBI"]
_KEYS = {"fwd": ["Sq", "Sk", "group"] + _FLAGS, "dkdv": ["Sq", "Sk", "group"] + _FLAGS,
         "dq": ["Sq", "Sk", "group", "MASK_GRAD"] + _FLAGS}
_INTERP = {"fwd": cfg.INTERP_FWD, "dkdv": cfg.INTERP_DKDV, "dq": cfg.INTERP_DQ}

# (kind, tiles) -> autotuner of that kind's kernel over exactly those tiles (each keeps its own
# timing cache)
_TUNED = {}


def _tuned(kernel, kind, tiles):
    """The autotuner of `kernel` over `tiles` (cfg.prune_tiles' pick for a launch). Pruning
    happens on the host before the launch, so the autotuner has configs and key only: what
    torch.library.wrap_triton accepts when torch.compile traces a fastattn_triton twin.
    (_compat.autotune: the Autotuner is built on first launch; Triton 3.2 needs a GPU for it.)"""
    tuned = _TUNED.get((kind, tiles))
    if tuned is None:
        tuned = _TUNED[(kind, tiles)] = _compat.autotune(
            configs=cfg.autotune_configs(tiles), key=_KEYS[kind])(kernel)
    return tuned


def _launch(kernel, kind, c, grid_rows, args, consts, rows, cols):
    """Launch `kernel` (kind "fwd", "dkdv" or "dq"): under the interpreter with one fixed
    tile; on a GPU autotuned over the tiles cfg.prune_tiles keeps for the device, the flags
    and the rows x cols the kernel covers (c: the _Case / _VarlenCase, for q and the arch)."""
    if interpreting():
        bm, bn, warps, stages = _INTERP[kind]
        launch(kernel)[(grid_rows(bm, bn),)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                             num_stages=stages, **consts)
        return
    tiles = cfg.prune_tiles(kind, c.arch, consts["BLOCK_D"], c.q.element_size(),
                            consts["DOT_PREC"], consts["VARLEN"], consts["HAS_ALIBI"], rows,
                            cols)
    launch(_tuned(kernel, kind, tiles))[
        lambda meta: (grid_rows(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **consts)


# ----------------------------------------------------------------------------- argument handling

def _as_int(x):
    """A Python int from an int or a one-element tensor (dropout_keep_mask's seed / offset)."""
    if isinstance(x, torch.Tensor):
        assert x.numel() == 1
        return int(x.item())
    return int(x)


def rng_tensor(seed, offset, like):
    """[seed, offset] as an int64 (2,) tensor on `like`'s device, which the kernels load
    (dropout_rng). seed / offset: ints or one-element int tensors (the ops layer passes the
    elements of its rng tensor); a tensor is never read on the host, so a traced launch needs
    no .item()."""
    device = next((x.device for x in (seed, offset) if isinstance(x, torch.Tensor)), like.device)
    parts = [x.reshape(1).to(device=device, dtype=torch.int64) if isinstance(x, torch.Tensor)
             else torch.tensor([int(x)], dtype=torch.int64, device=device)
             for x in (seed, offset)]
    return torch.cat(parts).to(like.device)


def _rows_aligned(t):
    """True when every row of `t` starts on 16 bytes (base address and the strides of all
    non-trivial dims) and its last dim is contiguous. The base address is the storage's
    (torch allocates >= 64-byte aligned storage; inductor copies graph inputs that are not 16-byte
    aligned) plus storage_offset(): both are known while torch.compile traces. The storage's
    own address is checked only on real data (not while a twin is traced: fake tensors have none);
    only a tensor made from foreign memory (from_blob, DLPack) could fail it."""
    if t.stride(-1) != 1 or (t.storage_offset() * t.element_size()) % 16:
        return False
    if not all(size == 1 or (stride * t.element_size()) % 16 == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
        return False
    return _compat.tracing_triton_op() or t.untyped_storage().data_ptr() % 16 == 0


def _padded_dim(D, elem):
    """D rounded up so a row of D elements is a whole number of 16-byte vectors."""
    vec = 16 // elem
    return triton.cdiv(D, vec) * vec


def _aligned_rows(t, row_len):
    """`t` itself when its rows are 16-byte aligned, else a copy with rows of `row_len` elements
    (zero-padded past D: the kernels mask the head dim in whole 16-byte vectors, so they read
    the pad as zeros). Kernels then always get aligned rows, which keeps their loads vectorised
    and their register use inside the validated tile table. The copy is the whole padded
    tensor (..., row_len), not a view of its first D columns (D is a kernel argument): torch.compile
    copies a traced kernel's tensor arguments as far as their view reaches
    (clone_preserve_strides), which would leave out the last row's pad."""
    if t.shape[-1] == row_len and _rows_aligned(t):
        return t
    buf = (t.new_zeros if row_len > t.shape[-1] else t.new_empty)(*t.shape[:-1], row_len)
    buf[..., :t.shape[-1]] = t
    return buf


def _empty_rows(shape, row_len, like):
    """A kernel output for `shape` with rows of `row_len` elements (*shape[:-1], row_len), the
    whole padded tensor as in _aligned_rows; _finish(out, D) takes the first D columns."""
    return torch.empty((*shape[:-1], row_len), device=like.device, dtype=like.dtype)


def _finish(t, D):
    """The output: the first D columns of `t`, contiguous (a copy only for padded rows)."""
    if t.shape[-1] != D:
        t = t[..., :D]
    return t if t.is_contiguous() else t.contiguous()


def _dot_precision(dtype):
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"   # ignored for 16-bit operands; the compiler default


class _Case:
    """Normalised arguments shared by forward, backward and decode. The public functions
    (fastattn.scaled_dot_product_attention, attention_lse, the modules) validate them and
    `unsupported` turns away what the kernels cannot run; here they are only asserted."""

    def __init__(self, q, k, v, mask, scale, causal, alignment, window_left, window_right,
                 softcap, key_lengths, dropout_p, seed, offset, alibi_slopes=None):
        assert q.dim() == 4 and q.dtype in _DTYPES and k.dtype == q.dtype == v.dtype
        B, H, Sq, D = q.shape
        assert k.dim() == 4 and k.shape[0] == B and k.shape[3] == D and v.shape == k.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        assert Hkv > 0 and H % Hkv == 0 and 1 <= D <= MAX_HEAD_DIM
        assert alignment in ("top_left", "bottom_right")
        assert 0.0 <= float(dropout_p) < 1.0 and (softcap is None or float(softcap) >= 0)
        self.B, self.H, self.Hkv, self.Sq, self.Sk, self.D = B, H, Hkv, Sq, Sk, D
        # every row the kernels touch starts on 16 bytes (copies only for odd layouts / D)
        self.row_len = _padded_dim(D, q.element_size())
        self.q, self.k, self.v = (_aligned_rows(t, self.row_len) for t in (q, k, v))
        self.group = H // Hkv
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
        self.causal = bool(causal)
        self.shift = Sk - Sq if alignment == "bottom_right" else 0
        self.wl = int(window_left) if window_left is not None else -1
        self.wr = int(window_right) if window_right is not None else -1
        self.softcap = float(softcap or 0.0)
        self.dropout_p = float(dropout_p)
        # [seed, offset] for the kernels to load, or a dummy pointer without dropout
        self.rng = rng_tensor(seed, offset, q) if self.dropout_p > 0 else q

        self.mask_kind = 0
        self.mask = q                                   # dummy pointer when there is no mask
        self.mask_strides = (0, 0, 0, 0)
        if mask is not None:
            assert mask.device == q.device and (mask.dtype == torch.bool
                                                or mask.is_floating_point())
            if tuple(mask.shape) != (B, H, Sq, Sk):             # (a view only when needed)
                mask = mask.expand(B, H, Sq, Sk)
            if mask.dtype == torch.bool:
                self.mask_kind = 1
                mask = mask.view(torch.uint8)           # same strides, loadable bytes
            else:
                self.mask_kind = 2
            self.mask = mask
            self.mask_strides = tuple(mask.stride())

        self.key_lengths = q                            # dummy pointer
        self.has_kl = key_lengths is not None
        if self.has_kl:
            assert key_lengths.shape == (B,) and not key_lengths.is_floating_point() \
                and key_lengths.dtype != torch.bool
            self.key_lengths = key_lengths.to(device=q.device, dtype=torch.int32).contiguous()

        self.block_d = cfg.block_d_of(D)
        # kernel keywords: the constexprs and the ALiBi slopes (Alibi: (B, H) fp32, or a dummy
        # pointer that HAS_ALIBI=False never reads)
        self.consts = dict(
            BLOCK_D=self.block_d, EVEN_D=(D == self.block_d), ALIGNED=True,
            IS_CAUSAL=self.causal,
            HAS_WL=self.wl >= 0, HAS_WR=self.wr >= 0, MASK_KIND=self.mask_kind,
            HAS_KL=self.has_kl, HAS_SOFTCAP=self.softcap > 0,
            DOT_PREC=_dot_precision(q.dtype), VARLEN=False,
            **alibi_kernel_args(alibi_slopes, B, H, q),
        )

    @property
    def no_cu_seqlens(self):
        """Dummy CuQ, CuK pointers of the dense (VARLEN=False) kernels."""
        return self.key_lengths, self.key_lengths

    @property
    def lse_strides(self):
        """(stride_lb, stride_lh) of lse and delta, contiguous (B, H, Sq)."""
        return self.H * self.Sq, self.Sq

    @property
    def arch(self):
        """q's device as sm_XY -> XY (the tile tables' key); None under the interpreter."""
        return None if interpreting() else cfg.device_arch(self.q)

    def scalars(self, dropout=True):
        s = [self.Sq, self.Sk, self.D, self.group, self.shift, self.wl, self.wr,
             self.scale, self.softcap]
        if dropout:
            s += [self.dropout_p, self.rng]
        return s


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def alibi_kernel_args(alibi_slopes, batch, heads, dummy):
    """Alibi / HAS_ALIBI keywords of the attention kernels: the slopes as a contiguous fp32
    (batch, heads) tensor (the ops layer passes it so), or `dummy` and HAS_ALIBI=False."""
    if alibi_slopes is None:
        return dict(Alibi=dummy, HAS_ALIBI=False)
    assert alibi_slopes.dtype == torch.float32 and alibi_slopes.device == dummy.device
    return dict(Alibi=alibi_slopes.expand(batch, heads).contiguous(), HAS_ALIBI=True)


# ----------------------------------------------------------------------------- forward

def attention_forward(q, k, v, *, mask=None, scale=None, causal=False, alignment="top_left",
                      window_left=-1, window_right=-1, softcap=0.0, key_lengths=None,
                      dropout_p=0.0, seed=0, offset=0, alibi_slopes=None):
    """out (B, H, Sq, D) in q's dtype and lse (B, H, Sq) fp32 (natural log, -inf for empty rows).

    Routes to the split-K decode kernels when Sq <= 16, Sk >= 512 and there is no dropout.
    """
    c = _Case(q, k, v, mask, scale, causal, alignment, window_left, window_right, softcap,
              key_lengths, dropout_p, seed, offset, alibi_slopes)
    if c.Sq <= DECODE_MAX_SQ and c.Sk >= DECODE_MIN_SK and c.dropout_p == 0.0:
        return _decode(c)
    out = _empty_rows((c.B, c.H, c.Sq, c.D), c.row_len, q)
    lse = torch.empty((c.B, c.H, c.Sq), device=q.device, dtype=torch.float32)
    if c.Sq == 0 or c.B * c.H == 0:
        return _finish(out, c.D), lse
    if c.Sk == 0:
        return _finish(out.zero_(), c.D), lse.fill_(float("-inf"))
    args = [c.q, c.k, c.v, out, lse, c.mask, c.key_lengths, *c.no_cu_seqlens,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(out), *c.mask_strides,
            *c.lse_strides, c.H, *c.scalars()]
    consts = dict(c.consts, HAS_DROPOUT=c.dropout_p > 0)
    _launch(attn_fwd_kernel, "fwd", c, lambda bm, bn: triton.cdiv(c.Sq, bm) * c.B * c.H, args,
            consts, c.Sq, c.Sk)
    return _finish(out, c.D), lse


# ----------------------------------------------------------------------------- backward

def attention_backward(dout, q, k, v, out, lse, *, mask=None, scale=None, causal=False,
                       alignment="top_left", window_left=-1, window_right=-1, softcap=0.0,
                       key_lengths=None, dropout_p=0.0, seed=0, offset=0, deterministic=False,
                       mask_needs_grad=False, alibi_slopes=None):
    """(dq, dk, dv, dmask_full | None). Always deterministic (no atomics)."""
    del deterministic   # the kernels never use atomics
    c = _Case(q, k, v, mask, scale, causal, alignment, window_left, window_right, softcap,
              key_lengths, dropout_p, seed, offset, alibi_slopes)
    assert dout.shape == q.shape and out.shape == q.shape and lse.shape == (c.B, c.H, c.Sq)
    assert not mask_needs_grad or c.mask_kind == 2, "mask_needs_grad needs a float mask"
    dout = _aligned_rows(dout.to(q.dtype), c.row_len)
    out = _aligned_rows(out, c.row_len)
    lse = lse.to(torch.float32).contiguous()

    dq = _empty_rows((c.B, c.H, c.Sq, c.D), c.row_len, q)
    dk = _empty_rows((c.B, c.Hkv, c.Sk, c.D), c.row_len, k)
    dv = _empty_rows((c.B, c.Hkv, c.Sk, c.D), c.row_len, v)
    dmask = None
    if mask_needs_grad:
        dmask = torch.zeros((c.B, c.H, c.Sq, c.Sk), device=q.device, dtype=torch.float32)
    if c.Sq == 0 or c.Sk == 0 or c.B * c.H == 0:
        return (_finish(dq.zero_(), c.D), _finish(dk.zero_(), c.D), _finish(dv.zero_(), c.D),
                dmask)

    delta = torch.empty((c.B, c.H, c.Sq), device=q.device, dtype=torch.float32)
    pre_bm = 16 if interpreting() else cfg.preprocess_block_m(c.block_d)
    launch(attn_bwd_preprocess_kernel)[(triton.cdiv(c.Sq, pre_bm) * c.B * c.H,)](
        out, dout, delta, *_strides3(out), *_strides3(dout), c.H, c.Sq, c.D,
        BLOCK_M=pre_bm, BLOCK_D=c.block_d, ALIGNED=True, DOT_PREC=c.consts["DOT_PREC"])

    consts = dict(c.consts, HAS_DROPOUT=c.dropout_p > 0)
    args = [c.q, c.k, c.v, dout, lse, delta, dk, dv, c.mask, c.key_lengths, *c.no_cu_seqlens,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(dout),
            *_strides3(dk), *_strides3(dv), *c.mask_strides, *c.lse_strides, c.H, c.Hkv,
            *c.scalars()]
    d_split = cfg.dkdv_d_split(c.arch, c.block_d, c.q.element_size(), consts["DOT_PREC"])
    _launch(attn_bwd_dkdv_kernel, "dkdv", c,
            lambda bm, bn: triton.cdiv(c.Sk, bn) * c.B * c.Hkv * d_split, args,
            dict(consts, D_SPLIT=d_split), c.Sq, c.Sk)

    args = [c.q, c.k, c.v, dout, lse, delta, dq, dmask if dmask is not None else delta,
            c.mask, c.key_lengths, *c.no_cu_seqlens,
            *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *_strides3(dout),
            *_strides3(dq), *c.mask_strides, *c.lse_strides, c.H, *c.scalars()]
    _launch(attn_bwd_dq_kernel, "dq", c, lambda bm, bn: triton.cdiv(c.Sq, bm) * c.B * c.H,
            args, dict(consts, MASK_GRAD=dmask is not None), c.Sq, c.Sk)
    return _finish(dq, c.D), _finish(dk, c.D), _finish(dv, c.D), dmask


# ----------------------------------------------------------------------------- decode

def _num_splits(c, bm, bn, device):
    n_blocks = triton.cdiv(c.Sk, bn)
    if interpreting():
        return min(4, n_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = c.B * c.Hkv * triton.cdiv(c.group * c.Sq, bm)
    return max(1, min(n_blocks, triton.cdiv(2 * sms, programs), 128))


def _decode(c, num_splits=None):
    out = torch.empty((c.B, c.H, c.Sq, c.D), device=c.q.device, dtype=c.q.dtype)
    lse = torch.empty((c.B, c.H, c.Sq), device=c.q.device, dtype=torch.float32)
    if c.Sq == 0 or c.B * c.H == 0:
        return out, lse
    if c.Sk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    # (the merge kernel writes `out` without vector hints: any row length is fine)
    bm, bn, warps, stages = decode_tiles(c.group, c.Sq, c.D, c.q.element_size(),
                                         prec=c.consts["DOT_PREC"],
                                         arch=c.arch)
    if num_splits is None:
        num_splits = _num_splits(c, bm, bn, c.q.device)
    chunk, num_splits = split_chunks(c.Sk, bn, num_splits)
    opart = torch.empty((c.B * c.H, num_splits, c.Sq, c.block_d), device=c.q.device,
                        dtype=torch.float32)
    lpart = torch.empty((c.B * c.H, num_splits, c.Sq), device=c.q.device, dtype=torch.float32)
    grid = (triton.cdiv(c.group * c.Sq, bm) * num_splits * c.B * c.Hkv,)
    launch(attn_decode_split_kernel)[grid](
        c.q, c.k, c.v, opart, lpart, c.mask, c.key_lengths,
        *_strides3(c.q), *_strides3(c.k), *_strides3(c.v), *c.mask_strides,
        c.H, c.Hkv, *c.scalars(dropout=False), chunk, num_splits,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        **{name: value for name, value in c.consts.items() if name != "VARLEN"})  # dense only
    merge_split_partials(opart, lpart, out, lse, _strides3(out), c.H, c.Sq, c.D)
    return out, lse


def attention_decode(q, k, v, *, mask=None, scale=None, causal=False, alignment="top_left",
                     window_left=-1, window_right=-1, softcap=0.0, key_lengths=None,
                     dropout_p=0.0, seed=0, offset=0, num_splits=None, alibi_slopes=None):
    """Split-K (flash-decoding) forward for few queries against many keys: (out, lse).

    Same semantics as attention_forward without dropout; any Sq works, it pays off for Sq <= 16.
    `num_splits` overrides the number of key chunks (default: enough programs to fill the GPU).
    """
    assert float(dropout_p) == 0.0, "the decode path has no dropout; use attention_forward"
    c = _Case(q, k, v, mask, scale, causal, alignment, window_left, window_right, softcap,
              key_lengths, 0.0, seed, offset, alibi_slopes)
    return _decode(c, num_splits)


# ----------------------------------------------------------------------------- dropout mask

def dropout_keep_mask(shape, dropout_p, seed, offset=0, device="cpu"):
    """The keep-mask (bool, `shape` = (B, H, Sq, Sk)) the kernels use for (seed, offset, p).

    Lets tests run the reference with exactly the kernels' dropout.
    """
    B, H, Sq, Sk = (int(s) for s in shape)
    keep = torch.empty((B, H, Sq, Sk), device=device, dtype=torch.uint8)
    if keep.numel() == 0:
        return keep.bool()
    bm, bn = 16, 64
    dropout_mask_kernel[(triton.cdiv(Sq, bm), triton.cdiv(Sk, bn), B * H)](
        keep, _as_int(seed), _as_int(offset), Sq, Sk, float(dropout_p),
        BLOCK_M=bm, BLOCK_N=bn)
    return keep.bool()


# ----------------------------------------------------------------------------- capability


def unsupported(op, **case):
    """Reason this backend cannot run the case, or None. Dropout is supported.

    Reads the ops layer's keys (dtype, device, head_dim, v_head_dim, dropout_p) and any tensor
    argument passed by name (q, k, v, dout, out, mask).
    """
    if not str(op).startswith("attention"):
        return f"op {op!r} is not an attention op"
    dtypes = [case.get("dtype")]
    devices = [case.get("device")]
    head_dim, v_head_dim = case.get("head_dim"), case.get("v_head_dim")
    for name in ("q", "k", "v", "dout", "out"):
        t = case.get(name)
        if isinstance(t, torch.Tensor):
            dtypes.append(t.dtype)
            devices.append(t.device)
    if isinstance(case.get("q"), torch.Tensor):
        head_dim = case["q"].shape[-1]
    if isinstance(case.get("v"), torch.Tensor):
        v_head_dim = case["v"].shape[-1]
    for dtype in dtypes:
        if dtype is not None and dtype not in _DTYPES:
            return f"dtype {dtype}"
    for device in devices:
        reason = None if device is None else device_reason(device, MIN_CAPABILITY)
        if reason:
            return reason
    if head_dim is not None and not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        return f"head dim {head_dim} outside 1..{MAX_HEAD_DIM}"
    if v_head_dim is not None and head_dim is not None and int(v_head_dim) != int(head_dim):
        return "v head dim differs from q/k head dim"
    if op == "attention_decode" and float(case.get("dropout_p", 0.0) or 0.0) > 0:
        return "dropout on the decode path"
    return None


def static_variants(arch):
    """Every configuration the launchers or autotuners may pick on `arch` (80 or 90); the
    ALiBi (HAS_ALIBI) variants last."""
    from ._attention_static import alibi_static_variants
    from ._attention_static import static_variants as _sv
    return _sv(arch) + alibi_static_variants(arch)
