"""Tile configurations for the attention kernels: candidates, per-arch pruning, interpreter picks.

On a GPU the launchers autotune over the candidates that survive `prune` for the device (shared
memory limit, register budget; every survivor was compiled for sm_80 and sm_90 with 0 spills).
Under TRITON_INTERPRET=1 nothing is autotuned: one small config keeps the interpreter fast.
"""

import os

import triton

# bytes of shared memory per block (opt-in maximum)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
FWD_CANDIDATES = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
    (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2),
]
# dK/dV: BLOCK_N keys stay resident, BLOCK_M query rows stream
DKDV_CANDIDATES = [
    (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2), (32, 64, 4, 1), (16, 64, 4, 1),
    (16, 32, 4, 1),
]
# dQ: BLOCK_M queries stay resident, BLOCK_N keys stream
DQ_CANDIDATES = [
    (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1), (64, 16, 4, 1),
    (32, 16, 4, 1),
]

# fixed picks for the interpreter: BLOCK_M != BLOCK_N so tile-edge logic is exercised
INTERP_FWD = (32, 16, 4, 1)
INTERP_DKDV = (16, 32, 4, 1)
INTERP_DQ = (32, 16, 4, 1)
INTERP_DECODE_BLOCK_N = 32


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_d_of(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def smem_estimate(kind, bm, bn, bd, elem, stages):
    """Bytes of shared memory a config needs (upper estimate, validated against compiled kernels)."""
    if kind == "fwd":      # Q once, K and V multi-buffered
        return bm * bd * elem + stages * 2 * bn * bd * elem + bm * bn * elem
    if kind == "dkdv":     # K, V resident; Q, dO multi-buffered; P^T and dS^T staged
        return 2 * bn * bd * elem + stages * 2 * bm * bd * elem + 2 * bm * bn * elem
    if kind == "dq":       # Q, dO resident; K, V multi-buffered; dS staged
        return 2 * bm * bd * elem + stages * 2 * bn * bd * elem + bm * bn * elem
    raise ValueError(f"kind: unknown kernel kind {kind!r}")


def regs_estimate(kind, bm, bn, bd, warps):
    """fp32 accumulator values per thread; the budget below keeps every survivor spill-free."""
    threads = 32 * warps
    if kind == "fwd":
        return (bm * bd + 2 * bm * bn) // threads
    if kind == "dkdv":
        return (2 * bn * bd + 3 * bm * bn) // threads
    return (bm * bd + 3 * bm * bn) // threads


REGS_BUDGET = 128


def candidates(kind):
    return {"fwd": FWD_CANDIDATES, "dkdv": DKDV_CANDIDATES, "dq": DQ_CANDIDATES}[kind]


def valid_configs(kind, arch, block_d, elem):
    """Candidates that fit `arch` for this head-dim block and element size."""
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[80])
    out = []
    for bm, bn, warps, stages in candidates(kind):
        if smem_estimate(kind, bm, bn, block_d, elem, stages) > limit:
            continue
        if regs_estimate(kind, bm, bn, block_d, warps) > REGS_BUDGET:
            continue
        if arch >= 90 and (warps % 4 != 0):
            continue
        out.append((bm, bn, warps, stages))
    return out


def autotune_configs(kind):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates(kind)]


def device_arch(tensor):
    import torch
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return major * 10 + minor


def make_prune(kind, rows_arg, cols_arg):
    """early_config_prune for triton.autotune: keep configs valid for the device, and no tile
    much larger than the sequence it covers (falls back to the smallest valid config)."""

    def prune(configs, nargs, **kwargs):
        q = nargs["Q"]
        arch = device_arch(q)
        elem = q.element_size()
        block_d = kwargs["BLOCK_D"]
        ok = set(valid_configs(kind, arch, block_d, elem))
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in ok]
        rows = nargs[rows_arg]
        cols = nargs[cols_arg]
        small = [c for c in kept
                 if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(rows))
                 and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(cols))]
        if small:
            return small
        return sorted(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]

    return prune


MERGE_BLOCK_S = 16   # splits merged per step; one compiled merge kernel serves any count


def decode_tiles(group, Sq, head_dim, interpret=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode split kernel.

    Rows are the group's (query head, query) pairs, so BLOCK_M follows group * Sq (16..64).
    """
    bm = min(64, max(16, triton.next_power_of_2(group * Sq)))
    if interpreting() if interpret is None else interpret:
        return bm, INTERP_DECODE_BLOCK_N, 4, 1
    return bm, 64, 4, (3 if block_d_of(head_dim) <= 128 else 2)
