"""The attention configurations the launchers/autotuners may pick, for the GPU static report.

Axes: dtype (fp16/bf16/fp32) x head-dim block (16..256; EVEN_D False stands for the padded
head dims 40, 80, 96, 112, 160, 192) x tile (every config `valid_configs` keeps on the arch)
x causal. Feature flags other than causal (mask, window, softcap, dropout, key_lengths) add a
few ALU ops and are listed off (they do not change the tiles).
"""

import inspect

from . import _attention_configs as cfg
from ._attention_configs import MERGE_BLOCK_S
from ._attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ._attention_decode import attn_decode_merge_kernel, attn_decode_split_kernel
from ._attention_fwd import attn_fwd_kernel
from .static_variant import StaticVariant

DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
# (BLOCK_D, EVEN_D): powers of two exactly, and padded representatives
HEAD_DIMS = [(16, True), (32, True), (64, True), (128, True), (256, True),
             (64, False), (128, False), (256, False)]

_FP32_PTRS = {"Lse", "Delta", "OPart", "LPart", "DMask"}
_PTRS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV", "Mask", "KeyLens"}
_FLOATS = {"sm_scale", "softcap", "dropout_p"}


def _signature(kernel, dtype, constexprs):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _PTRS:                        # dummy Mask/KeyLens share q's type
            sig[name] = "*" + dtype
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _flags(block_d, even_d, causal, dtype):
    return dict(BLOCK_D=block_d, EVEN_D=even_d, IS_CAUSAL=causal, HAS_WL=False, HAS_WR=False,
                MASK_KIND=0, HAS_KL=False, HAS_SOFTCAP=False,
                DOT_PREC="ieee" if dtype == "fp32" else "tf32")


def _variant(kernel, name, dtype, label, constexprs, warps, stages):
    return StaticVariant(kernel=kernel, name=name, config=f"{dtype} {label} w={warps} s={stages}",
                         signature=_signature(kernel, dtype, constexprs), constexprs=constexprs,
                         num_warps=warps, num_stages=stages)


def static_variants(arch):
    out = []
    for dtype, elem in DTYPES.items():
        for block_d, even_d in HEAD_DIMS:
            dlabel = f"d={block_d}" + ("" if even_d else " padded")
            for causal in (False, True):
                flags = _flags(block_d, even_d, causal, dtype)
                clabel = dlabel + (" causal" if causal else "")
                for kind, kernel, extra in (("fwd", attn_fwd_kernel, dict(HAS_DROPOUT=False)),
                                            ("dkdv", attn_bwd_dkdv_kernel, dict(HAS_DROPOUT=False)),
                                            ("dq", attn_bwd_dq_kernel,
                                             dict(HAS_DROPOUT=False, MASK_GRAD=False))):
                    for bm, bn, w, s in cfg.valid_configs(kind, arch, block_d, elem):
                        consts = dict(flags, **extra, BLOCK_M=bm, BLOCK_N=bn)
                        name = {"fwd": "attention_fwd", "dkdv": "attention_bwd_dkdv",
                                "dq": "attention_bwd_dq"}[kind]
                        out.append(_variant(kernel, name, dtype, f"{clabel} BM={bm} BN={bn}",
                                            consts, w, s))
                # decode: BLOCK_M follows group * Sq (16, 32 or 64), fixed BLOCK_N
                for bm in (16, 32, 64):
                    bm_, bn, w, s = _decode_tiles(bm, block_d)
                    consts = dict(flags, BLOCK_M=bm_, BLOCK_N=bn)
                    out.append(_variant(attn_decode_split_kernel, "attention_decode_split", dtype,
                                        f"{clabel} BM={bm_} BN={bn}", consts, w, s))
            if even_d:
                out.append(_variant(attn_bwd_preprocess_kernel, "attention_bwd_preprocess",
                                    dtype, f"d={block_d} BM=64",
                                    dict(BLOCK_M=64, BLOCK_D=block_d), 4, 3))
                out.append(_variant(attn_decode_merge_kernel, "attention_decode_merge",
                                    dtype, f"d={block_d} BS={MERGE_BLOCK_S}",
                                    dict(BLOCK_S=MERGE_BLOCK_S, BLOCK_D=block_d), 4, 3))
    return out


def _decode_tiles(bm, block_d):
    # decode_tiles takes (group, Sq, head_dim); group * Sq = bm gives BLOCK_M = bm
    return cfg.decode_tiles(bm, 1, block_d, interpret=False)
