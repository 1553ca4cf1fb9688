"""The attention configurations the launchers/autotuners may pick, for the GPU static report.

Axes: dtype (fp16/bf16/fp32 IEEE/fp32 TF32) x head-dim block (16..256; "padded" is EVEN_D
False: head dims 40, 80, 96, 112, 160, 192) x tile (every tile `valid_configs` keeps on the arch)
x causal. Rows are always 16-byte aligned (ALIGNED): the launchers copy inputs whose rows are
not. Feature flags other than causal (mask, window, softcap, dropout, key_lengths) add a few
ALU ops and are listed off. ALiBi (HAS_ALIBI) is listed on its own (alibi_static_variants):
it adds a slope load and a per-element term to the score tiles.
"""

import inspect

from . import _attention_configs as cfg
from ._attention_configs import MERGE_BLOCK_S
from ._attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ._attention_decode import attn_decode_merge_kernel, attn_decode_split_kernel
from ._attention_fwd import attn_fwd_kernel
from .static_variant import StaticVariant

# label -> (signature dtype, element bytes, dot input precision)
DTYPES = {"fp16": ("fp16", 2, "tf32"), "bf16": ("bf16", 2, "tf32"),
          "fp32": ("fp32", 4, "ieee"), "tf32": ("fp32", 4, "tf32")}
# (BLOCK_D, EVEN_D): powers of two exactly, and padded representatives
HEAD_DIMS = [(16, True), (32, True), (64, True), (128, True), (256, True),
             (64, False), (128, False), (256, False)]

_FP32_PTRS = {"Lse", "Delta", "OPart", "LPart", "DMask", "Alibi"}
_PTRS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV", "Mask", "KeyLens"}
_FLOATS = {"sm_scale", "softcap", "dropout_p"}
_I32_PTRS = {"CuQ", "CuK"}                          # varlen offsets (dummies when dense)
_I64_PTRS = {"Rng"}                                 # dropout [seed, offset] (unread when off)


def _signature(kernel, dtype, constexprs):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _I64_PTRS:
            sig[name] = "*i64"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _PTRS:                        # dummy Mask/KeyLens share q's type
            sig[name] = "*" + dtype
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _flags(block_d, even_d, aligned, causal, prec):
    return dict(BLOCK_D=block_d, EVEN_D=even_d, ALIGNED=aligned, IS_CAUSAL=causal, HAS_WL=False,
                HAS_WR=False, MASK_KIND=0, HAS_KL=False, HAS_SOFTCAP=False, DOT_PREC=prec,
                VARLEN=False, HAS_ALIBI=False)


def _variant(kernel, name, label, sig_dtype, config, constexprs, warps, stages):
    return StaticVariant(kernel=kernel, name=name, config=f"{label} {config} w={warps} s={stages}",
                         signature=_signature(kernel, sig_dtype, constexprs),
                         constexprs=constexprs, num_warps=warps, num_stages=stages)


_KERNELS = (("fwd", "attention_fwd", attn_fwd_kernel, dict(HAS_DROPOUT=False)),
            ("dkdv", "attention_bwd_dkdv", attn_bwd_dkdv_kernel, dict(HAS_DROPOUT=False)),
            ("dq", "attention_bwd_dq", attn_bwd_dq_kernel,
             dict(HAS_DROPOUT=False, MASK_GRAD=False)))


def static_variants(arch):
    out = []
    for label, (sig_dtype, elem, prec) in DTYPES.items():
        for block_d, even_d in HEAD_DIMS:
            dlabel = f"d={block_d}" + ("" if even_d else " padded")
            for causal in (False, True):
                flags = _flags(block_d, even_d, True, causal, prec)
                clabel = dlabel + (" causal" if causal else "")
                out += _tile_variants(arch, label, sig_dtype, elem, prec, block_d, flags,
                                      clabel)
                out += _decode_variants(arch, label, sig_dtype, elem, prec, block_d, flags,
                                        clabel)
            if even_d:                         # the delta kernel's dot follows DOT_PREC
                pre_bm = cfg.preprocess_block_m(block_d)
                out.append(_variant(attn_bwd_preprocess_kernel, "attention_bwd_preprocess",
                                    label, sig_dtype, f"d={block_d} BM={pre_bm}",
                                    dict(BLOCK_M=pre_bm, BLOCK_D=block_d, ALIGNED=True,
                                         DOT_PREC=prec), 4, 3))
            if even_d and label != "tf32":     # no dots below: one variant per storage dtype
                out.append(_variant(attn_decode_merge_kernel, "attention_decode_merge", label,
                                    sig_dtype, f"d={block_d} BS={MERGE_BLOCK_S}",
                                    dict(BLOCK_S=MERGE_BLOCK_S, BLOCK_D=block_d), 4, 3))
    return out


# Varlen (VARLEN=True, kernels/varlen_attention.py): the same kernels and tiles; the packed mode
# adds the per-sequence offset loads and the early exit. Listed for the head dims of
# packed training (64, 128) in every dtype, causal (the dense list above covers the flags'
# effect on these tiles; the report is slow, so the varlen list stays short).
VARLEN_HEAD_DIMS = [(64, True), (128, True)]


def varlen_static_variants(arch):
    out = []
    for label, (sig_dtype, elem, prec) in DTYPES.items():
        for block_d, even_d in VARLEN_HEAD_DIMS:
            dlabel = f"d={block_d}" + ("" if even_d else " padded")
            for causal in (True,):
                flags = dict(_flags(block_d, even_d, True, causal, prec), VARLEN=True)
                clabel = dlabel + (" causal" if causal else "")
                out += _tile_variants(arch, label, sig_dtype, elem, prec, block_d, flags,
                                      clabel, prefix="varlen_", varlen=True)
    return out


# ALiBi (HAS_ALIBI=True): the forward, both backward kernels and (dense) the split-K decode
# kernel at the common head dims, causal, every dtype and tile, dense and packed (VARLEN)
# (the flag off compiles as before).
ALIBI_HEAD_DIMS = [(64, True), (128, True)]


def alibi_static_variants(arch, varlen=False):
    out = []
    prefix = "varlen_" if varlen else ""
    for label, (sig_dtype, elem, prec) in DTYPES.items():
        for block_d, even_d in ALIBI_HEAD_DIMS:
            flags = dict(_flags(block_d, even_d, True, True, prec), HAS_ALIBI=True,
                         VARLEN=varlen)
            clabel = f"d={block_d} causal alibi"
            out += _tile_variants(arch, label, sig_dtype, elem, prec, block_d, flags, clabel,
                                  prefix=prefix, varlen=varlen, alibi=True)
            if not varlen:
                out += _decode_variants(arch, label, sig_dtype, elem, prec, block_d, flags,
                                        clabel)
    return out


def _tile_variants(arch, label, sig_dtype, elem, prec, block_d, flags, clabel, prefix="",
                   **config_kw):
    """The forward and both backward kernels in every tile cfg.valid_configs lists for them
    (config_kw: its varlen / alibi switches); dK/dV with the head-dim split it would run."""
    out = []
    for kind, name, kernel, extra in _KERNELS:
        for bm, bn, w, s in cfg.valid_configs(kind, arch, block_d, elem, prec, **config_kw):
            consts = dict(flags, **extra, BLOCK_M=bm, BLOCK_N=bn)
            tile_label = f"{clabel} BM={bm} BN={bn}"
            if kind == "dkdv":
                consts["D_SPLIT"] = cfg.dkdv_d_split(arch, block_d, elem, prec,
                                                     interpret=False)
                if consts["D_SPLIT"] > 1:
                    tile_label += f" DS={consts['D_SPLIT']}"
            out.append(_variant(kernel, prefix + name, label, sig_dtype, tile_label, consts,
                                w, s))
    return out


def _decode_variants(arch, label, sig_dtype, elem, prec, block_d, flags, clabel):
    """The split-K decode kernel: BLOCK_M follows group * Sq (16, 32 or 64), fixed BLOCK_N."""
    out = []
    for bm, bn, w, s in sorted({_decode_tiles(m, block_d, elem, prec, arch)
                                for m in (16, 32, 64)}):
        consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
        del consts["VARLEN"]                # the decode kernel has no packed mode
        out.append(_variant(attn_decode_split_kernel, "attention_decode_split", label,
                            sig_dtype, f"{clabel} BM={bm} BN={bn}", consts, w, s))
    return out


def _decode_tiles(bm, block_d, elem, prec, arch):
    # decode_tiles takes (group, Sq, head_dim, ...); group * Sq = bm gives BLOCK_M = bm
    return cfg.decode_tiles(bm, 1, block_d, elem, interpret=False, prec=prec, arch=arch)
