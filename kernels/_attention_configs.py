"""Tiles for the attention kernels: the validated table, per-arch pruning, interpreter picks.

On a GPU the launchers autotune over the table's tiles that survive `prune_tiles` for the
device and call (shared-memory limit of the arch, row alignment, sequence lengths). Under
TRITON_INTERPRET=1 nothing is autotuned: one small config keeps the interpreter fast.
"""

import functools

import triton

from ._compat import interpreting

# bytes of shared memory per block (opt-in maximum)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Tiles the autotuner may pick: (kind, element bytes, BLOCK_D) -> [(BLOCK_M, BLOCK_N, num_warps,
# num_stages), ...], largest first. Every entry was compiled for sm_80 and sm_90 (aligned rows,
# causal or not, exact and padded head dims) with 0 spills; `valid_configs` then drops what does
# not fit the arch's shared memory.
# dK/dV tiles are keys x queries (BLOCK_N keys resident), so its MMAs have M = BLOCK_N.
_SMALL_D = (16, 32, 64)
TABLE = {}
for _bd in _SMALL_D:
    TABLE[("fwd", 2, _bd)] = [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]
    TABLE[("dkdv", 2, _bd)] = [(32, 128, 8, 2), (32, 64, 8, 2)]
    TABLE[("dq", 2, _bd)] = [(128, 64, 8, 2), (64, 64, 4, 2)]
TABLE[("fwd", 2, 128)] = [(128, 64, 8, 3), (64, 64, 8, 3)]
TABLE[("dkdv", 2, 128)] = [(32, 64, 8, 2)]   # (64, 64, 8, 2) spills padded on sm_90
TABLE[("dq", 2, 128)] = [(128, 32, 8, 2), (64, 32, 4, 2)]
TABLE[("fwd", 2, 256)] = [(64, 64, 8, 2), (64, 32, 8, 2)]
TABLE[("dkdv", 2, 256)] = [(32, 32, 4, 1), (16, 32, 4, 1)]
TABLE[("dq", 2, 256)] = [(128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 1)]

# fp32, IEEE dots (CUDA-core FMAs, no tensor cores), hence small tiles. ptxas spills a register or
# a few around the loop on many of them (often well below 255 registers), differently per arch,
# head dim and flags, so each entry is one that compiled clean everywhere; 2 stages avoided most.
TABLE[("fwd", 4, 16)] = [(32, 32, 4, 2), (32, 16, 4, 1)]
TABLE[("fwd", 4, 32)] = [(32, 32, 4, 1), (32, 16, 4, 1)]     # 32x32 s=2 spilled on sm_90
TABLE[("fwd", 4, 64)] = [(32, 32, 4, 2)]                     # 32x16 s=1 spilled padded, sm_90
TABLE[("dkdv", 4, 16)] = [(16, 32, 4, 1)]                    # 32x64 w=8 spilled on sm_80
TABLE[("dkdv", 4, 32)] = [(16, 64, 8, 2), (16, 16, 4, 1)]
TABLE[("dkdv", 4, 64)] = [(16, 64, 8, 2), (16, 32, 4, 1)]
TABLE[("dq", 4, 16)] = [(64, 16, 4, 1), (32, 16, 4, 1)]
TABLE[("dq", 4, 32)] = [(32, 16, 4, 1)]                      # 64x16 spilled causal (s=1, s=2)
TABLE[("dq", 4, 64)] = [(64, 16, 4, 2), (32, 16, 4, 1)]
TABLE[("fwd", 4, 128)] = [(32, 16, 8, 1)]                    # 16x16 w=4 spilled padded, sm_90
TABLE[("dkdv", 4, 128)] = [(16, 64, 8, 2)]                   # 32x64, 16x32, 16x16 spilled
TABLE[("dq", 4, 128)] = [(32, 16, 4, 1)]                     # 64x32 w=8 spilled padded, sm_90
TABLE[("fwd", 4, 256)] = [(16, 16, 4, 2)]
TABLE[("dkdv", 4, 256)] = [(16, 16, 8, 1)]                   # sm_90: ARCH_TABLE
TABLE[("dq", 4, 256)] = [(32, 16, 8, 1)]

# Entries that differ per arch: (arch, kind, element bytes, BLOCK_D) -> tiles, replacing TABLE's.
# fp32 IEEE dK/dV at d=256: no tile found clean on both (16x16 w=8 s=1 spills on sm_90, s=2 on
# sm_80 padded, 16x32 w=8 s=2 on sm_90).
# fp16/bf16 dK/dV at d=256 on sm_90: the 32-key tiles above use mma.sync (HMMA; wgmma needs an
# MMA M of 64, here the key count); 64 keys with 8 warps and 2 stages compiled spill-free with
# HGMMA (1 stage spilled 63 registers, 4 warps 384).
ARCH_TABLE = {
    (90, "dkdv", 4, 256): [(16, 16, 8, 2)],
    (90, "dkdv", 2, 256): [(16, 64, 8, 2)],
}

# fp32 with TF32 dots (DOT_PREC "tf32", torch.backends.cuda.matmul.allow_tf32): tensor-core
# dots hold fp32 operands (twice the bytes of fp16) in registers, so it has its own tiles:
# (kind, BLOCK_D) -> tiles, used instead of TABLE[(kind, 4, BLOCK_D)]; same 0-spill check on
# sm_80 and sm_90. Tiles that spilled with TF32: dK/dV 32x64 w=8 at d=64 (sm_80, 255 regs),
# dK/dV 32x64 w=8 at d=128 (sm_90, wgmma), dK/dV 16x32 w=4 and w=8 s=1 at d=128 (both archs),
# forward 16x16 s=1 at d=256 padded (sm_90). On sm_90 only tiles whose MMA M is a multiple
# of 64 use wgmma (HGMMA); the smaller ones use mma.sync (HMMA), like fp16 decode.
TF32_TABLE = {}
for _bd in _SMALL_D:
    TF32_TABLE[("fwd", _bd)] = [(32, 32, 4, 2), (32, 16, 4, 1)]
    TF32_TABLE[("dkdv", _bd)] = [(32, 64, 8, 1), (16, 32, 4, 1)]
    TF32_TABLE[("dq", _bd)] = [(64, 16, 4, 1), (32, 16, 4, 1)]
TF32_TABLE[("dkdv", 64)] = [(16, 64, 8, 1), (16, 32, 4, 1)]
TF32_TABLE[("fwd", 128)] = [(32, 16, 8, 1), (16, 16, 4, 1)]
TF32_TABLE[("dkdv", 128)] = [(32, 32, 8, 2), (16, 32, 8, 2)]
TF32_TABLE[("dq", 128)] = [(64, 32, 8, 1), (32, 16, 4, 1)]
TF32_TABLE[("fwd", 256)] = [(16, 16, 4, 2)]
TF32_TABLE[("dkdv", 256)] = [(16, 16, 8, 1)]
TF32_TABLE[("dq", 256)] = [(32, 16, 8, 1)]

# TF32 on sm_90: wgmma (HGMMA) needs an MMA M of 64 (queries for fwd/dq, keys for dK/dV), which
# none of TF32_TABLE's tiles has; these compiled spill-free with HGMMA for every head-dim block,
# exact and padded, causal or not (swept over BLOCK_N 16/32/64, 4/8 warps, 1/2 stages, largest
# first). dK/dV at d=128 takes 128 keys over two warpgroups (its 64-key tiles spilled 4 to 97
# registers). dK/dV at d=256: with the whole head dim per program every 64-key tile spilled
# (81 to 591 registers) and 128 keys exceed shared memory; with the head dim split over two
# programs (D_SPLIT, `dkdv_d_split`) 16x64 w=8 s=2 is clean (255 registers, 225 KiB shared;
# s=1, w=4, 32x64 and D_SPLIT = 4 spilled 1 to 72).
ARCH_TF32_TABLE = {}
for _bd in (16, 32, 64, 128):
    ARCH_TF32_TABLE[(90, "fwd", _bd)] = [(64, 64, 8, 2)]
    ARCH_TF32_TABLE[(90, "dq", _bd)] = [(64, 64, 8, 2)]
for _bd in _SMALL_D:
    ARCH_TF32_TABLE[(90, "dkdv", _bd)] = [(32, 64, 8, 2)]
ARCH_TF32_TABLE[(90, "dkdv", 128)] = [(16, 128, 8, 2)]
ARCH_TF32_TABLE[(90, "dkdv", 256)] = [(16, 64, 8, 2)]          # with D_SPLIT = 2, see below
ARCH_TF32_TABLE[(90, "fwd", 256)] = [(64, 64, 8, 1)]
ARCH_TF32_TABLE[(90, "dq", 256)] = [(64, 16, 8, 2)]

# Packed (VARLEN) mode: each sequence's lengths and causal shift are loaded values held in
# registers (kernel arguments in the dense mode), and these tiles of the tables above then
# spilled 1-4 registers (static report, causal): (arch, kind, element bytes, dot precision,
# BLOCK_D) -> tiles used instead in that mode; each compiled spill-free, exact and padded.
# (sm_90 TF32 dK/dV at d=128: every 128-key wgmma tile spilled, so 32x32 runs on mma.sync.)
VARLEN_TABLE = {
    (80, "fwd", 4, "ieee", 64): [(32, 16, 4, 2)],
    (80, "dq", 4, "ieee", 128): [(32, 16, 8, 1)],
    (90, "dkdv", 4, "tf32", 128): [(32, 32, 8, 2)],
}

# ALiBi (HAS_ALIBI): the bias term holds a (rows, keys) distance tile; these tiles of the
# tables above then spilled (static report, causal): (arch, kind, element bytes, dot precision,
# BLOCK_D, varlen) -> tiles used instead with ALiBi; each compiled spill-free.
# (sm_80 TF32 dQ at d=128: 32x16 w=4 s=1 spilled 4 registers; 8 warps take it at 130.
# sm_80 IEEE fp32 packed dK/dV at d=64: 16x64 w=8 s=2 and 16x32 w=4 s=1 spilled 2 and 6;
# one stage less / one more: 104 and 127 registers, clean.)
ALIBI_TABLE = {
    (80, "dq", 4, "tf32", 128, False): [(64, 32, 8, 1), (32, 16, 8, 1)],
    (80, "dkdv", 4, "ieee", 64, True): [(16, 64, 8, 1), (16, 32, 4, 2)],
}

# fixed picks for the interpreter: BLOCK_M != BLOCK_N so tile-edge logic is exercised
INTERP_FWD = (32, 16, 4, 1)
INTERP_DKDV = (16, 32, 4, 1)
INTERP_DQ = (32, 16, 4, 1)
INTERP_DECODE_BLOCK_N = 32
# the interpreter splits dK/dV head-dim blocks from this size on, so the parity tests run both
# the D_SPLIT = 1 and the D_SPLIT = 2 code of the dK/dV kernel
INTERP_DKDV_SPLIT_FROM = 64


def block_d_of(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# dK/dV programs per key block, each writing BLOCK_D // D_SPLIT head-dim columns of dK and dV:
# (arch, BLOCK_D) -> D_SPLIT for TF32 (1 everywhere else). Halves the accumulators that must stay
# in registers, at the price of recomputing S and dP in both programs (1.5x the dK/dV FLOPs).
TF32_DKDV_D_SPLIT = {(90, 256): 2}


def dkdv_d_split(arch, block_d, elem, prec, interpret=None):
    """D_SPLIT of the dK/dV kernel for this arch, head-dim block, element size and precision."""
    if interpreting() if interpret is None else interpret:
        return 2 if block_d >= INTERP_DKDV_SPLIT_FROM else 1
    if elem == 4 and prec == "tf32":
        return TF32_DKDV_D_SPLIT.get((arch, block_d), 1)
    return 1


def smem_estimate(kind, bm, bn, bd, elem, stages, d_split=1, wgmma=False):
    """Bytes of shared memory a config needs: an estimate for pruning, mostly high (the
    compiled kernels of the static report use 0.33x to 1.0x of it, dK/dV up to 1.21x on
    sm_80 at d=256); the static report checks the real figure against each arch's limit.
    d_split: dK/dV's D_SPLIT; wgmma: dK/dV's MMAs run as wgmma (sm_90)."""
    if kind == "fwd":      # Q once, K and V multi-buffered
        return bm * bd * elem + stages * 2 * bn * bd * elem + bm * bn * elem
    if kind == "dkdv":     # K, V resident; Q, dO multi-buffered (and their column slices)
        est = 2 * bn * bd * elem + stages * 2 * bm * bd * elem
        if d_split > 1:
            est += stages * 2 * bm * (bd // d_split) * elem
        if not wgmma:      # P^T and dS^T staged for mma.sync; wgmma reads them from registers
            est += 2 * bm * bn * elem
        return est
    if kind == "dq":       # Q, dO resident; K, V multi-buffered; dS staged
        return 2 * bm * bd * elem + stages * 2 * bn * bd * elem + bm * bn * elem
    raise ValueError(f"kind: unknown kernel kind {kind!r}")


def uses_wgmma(kind, arch, bm, bn, elem, prec):
    """Whether the tile's dots compile to wgmma (HGMMA): sm_90, tensor-core operands (fp16/bf16
    or TF32) and an MMA M (queries, or keys for dK/dV) that is a multiple of 64."""
    mma_m = bn if kind == "dkdv" else bm
    return (arch is not None and arch >= 90 and (elem == 2 or prec == "tf32")
            and mma_m % 64 == 0)


def table_tiles(kind, block_d, elem, prec="ieee", arch=None, varlen=False, alibi=False):
    """The tiles of `kind` for this head-dim block, element size, dot precision and arch
    (varlen: for the kernels' packed mode; alibi: with the ALiBi term)."""
    akey = (arch, kind, elem, prec if elem == 4 else "", block_d, bool(varlen))
    if alibi and akey in ALIBI_TABLE:
        return ALIBI_TABLE[akey]
    if varlen and (arch, kind, elem, prec if elem == 4 else "", block_d) in VARLEN_TABLE:
        return VARLEN_TABLE[(arch, kind, elem, prec if elem == 4 else "", block_d)]
    if elem == 4 and prec == "tf32":
        return ARCH_TF32_TABLE.get((arch, kind, block_d), TF32_TABLE[(kind, block_d)])
    return ARCH_TABLE.get((arch, kind, elem, block_d), TABLE[(kind, elem, block_d)])


def valid_configs(kind, arch, block_d, elem, prec="ieee", varlen=False, alibi=False):
    """The table's tiles that fit `arch`'s shared memory for this head-dim block, element size
    and dot precision (`prec` matters for fp32 only: "ieee" or "tf32").

    (The launchers always hand the kernels 16-byte aligned rows, ALIGNED=True, which is what the
    table was checked with; unaligned inputs are copied first.)
    """
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[80])
    d_split = dkdv_d_split(arch, block_d, elem, prec, interpret=False) if kind == "dkdv" else 1
    out = [c for c in table_tiles(kind, block_d, elem, prec, arch, varlen, alibi)
           if smem_estimate(kind, c[0], c[1], block_d, elem, c[3], d_split,
                            uses_wgmma(kind, arch, c[0], c[1], elem, prec)) <= limit]
    if not out:
        raise ValueError(f"block_d: no {kind} tile fits sm_{arch} for BLOCK_D={block_d}")
    return out


def all_configs(kind):
    """Every tile of `kind` in the tables (the pool prune_tiles picks each launch's from)."""
    seen = []
    lists = [(k, tiles) for (k, _, _), tiles in TABLE.items()]
    lists += [(k, tiles) for (_, k, _, _), tiles in ARCH_TABLE.items()]
    lists += [(k, tiles) for (k, _), tiles in TF32_TABLE.items()]
    lists += [(k, tiles) for (_, k, _), tiles in ARCH_TF32_TABLE.items()]
    lists += [(k, tiles) for (_, k, _, _, _), tiles in VARLEN_TABLE.items()]
    lists += [(k, tiles) for (_, k, _, _, _, _), tiles in ALIBI_TABLE.items()]
    for k, tiles in lists:
        for t in tiles:
            if k == kind and t not in seen:
                seen.append(t)
    return seen


def autotune_configs(tiles):
    """triton.Config objects of (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles]


def device_arch(tensor):
    """sm_XY of the tensor's GPU as XY (asked once per device: the launchers ask every launch)."""
    return _device_arch(tensor.device)


@functools.lru_cache(maxsize=None)
def _device_arch(device):
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def prune_tiles(kind, arch, block_d, elem, prec="ieee", varlen=False, alibi=False, rows=1,
                cols=1):
    """The tiles the autotuner times for one launch, in all_configs order: those valid for the
    arch (valid_configs) and none much larger than the rows x cols it covers (else the smallest
    valid tile). Decided on the host before launching (kernels/attention.py: _launch), so the
    autotuner needs no prune_configs_by, which torch.library.wrap_triton refuses. Cached: the
    answer depends on the lengths only through their next powers of two."""
    return _prune_tiles(kind, arch, block_d, elem, prec, bool(varlen), bool(alibi),
                        max(16, triton.next_power_of_2(int(rows))),
                        max(16, triton.next_power_of_2(int(cols))))


@functools.lru_cache(maxsize=None)
def _prune_tiles(kind, arch, block_d, elem, prec, varlen, alibi, max_bm, max_bn):
    ok = set(valid_configs(kind, arch, block_d, elem, prec, varlen, alibi))
    kept = [t for t in all_configs(kind) if t in ok]
    small = [t for t in kept if t[0] <= max_bm and t[1] <= max_bn]
    if small:
        return tuple(small)
    return tuple(sorted(kept, key=lambda t: t[0] * t[1])[:1])


MERGE_BLOCK_S = 16   # splits merged per step; one compiled merge kernel serves any count


def decode_tiles(group, Sq, head_dim, elem=2, interpret=None, prec="ieee", arch=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode split kernel.

    Rows are the group's (query head, query) pairs, so BLOCK_M follows group * Sq (16..64,
    16..32 for fp32, 16 for fp32 at head dims above 128);
    BLOCK_N / warps follow the head dim and element size (checked spill-free like TABLE).
    On sm_90 (arch >= 90) tensor-core dots (fp16/bf16, TF32) always take 64 rows: wgmma
    (HGMMA) needs an MMA M of 64, and decode is bound by reading K/V, not by the padded rows'
    MMAs (every such tile compiled spill-free with HGMMA).
    """
    # fp32 (CUDA-core dots) spills at 64 rows; more row blocks are cheap at decode sizes
    bm_max = 64 if elem == 2 else 32
    if elem == 4 and block_d_of(head_dim) > 128:
        bm_max = 16                    # 32 rows spilled on sm_80 (IEEE and TF32)
    bm = min(bm_max, max(16, triton.next_power_of_2(group * Sq)))
    if interpreting() if interpret is None else interpret:
        return bm, INTERP_DECODE_BLOCK_N, 4, 1
    bd = block_d_of(head_dim)
    wgmma = arch is not None and arch >= 90 and (elem == 2 or prec == "tf32")
    if wgmma:
        bm = 64
    if elem == 2:
        if bd <= 64:
            return bm, 64, 4, 2        # 3 stages spill a few registers on sm_80 here
        return (bm, 64, 4, 3) if bd == 128 else (bm, 32, 8, 2)
    if wgmma:                          # TF32 on sm_90
        return (64, 32, 4, 2) if bd <= 128 else (64, 32, 8, 2)
    if bd <= 64:
        return bm, 16, 4, 2
    if bd == 256 and prec != "tf32":
        return bm, 16, 4, 2            # IEEE: w=8 s=1 spilled a few registers on both archs
    return bm, 16, 8, 1


def preprocess_block_m(block_d):
    """Rows per program of the backward's delta kernel (o and dO tiles stay spill-free)."""
    return min(64, 8192 // block_d)
