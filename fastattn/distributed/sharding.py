"""How a sequence is split over the ranks of a context-parallel group.

layout="contiguous": the sequence is cut into W equal pieces; rank r holds piece r.
layout="zigzag": the sequence is cut into 2W equal chunks; rank r holds chunks r and 2W-1-r
(in that order). Under causal attention chunk c attends to c + 1/2 chunks of keys, so each
rank's pair of chunks does the same amount of work: (r + 1/2) + (2W - 1 - r + 1/2) = 2W chunks.
"""

import torch

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_rank(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def num_chunks(world_size, layout):
    """Chunks the full sequence is cut into: 2W (zigzag) or W (contiguous)."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def local_chunks(local_len, rank, world_size, layout):
    """[(global_start, local_start, length)] of the chunks of rank `rank`'s shard of length
    `local_len`, in the order they are stored locally (global starts increase)."""
    check_layout(layout)
    _check_rank(rank, world_size)
    if layout == "contiguous":
        return [(rank * local_len, 0, local_len)]
    if local_len % 2:
        raise ValueError(f"zigzag shards hold two equal chunks: the local sequence length must "
                         f"be even, got {local_len}")
    c = local_len // 2
    return [(rank * c, 0, c), ((2 * world_size - 1 - rank) * c, c, c)]


def shard_positions(seq_len, rank, world_size, layout="zigzag", device=None):
    """int64 (seq_len // W,): the global positions of rank `rank`'s shard (e.g. for RoPE)."""
    local_len = _local_len(seq_len, world_size, layout)
    return torch.cat([torch.arange(g, g + n, device=device)
                      for g, _, n in local_chunks(local_len, rank, world_size, layout)])


def _local_len(seq_len, world_size, layout):
    n = num_chunks(world_size, layout)
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} must be divisible by {n} for layout "
                         f"{layout!r} over {world_size} ranks")
    return seq_len // world_size


def shard_sequence(x, dim, rank, world_size, layout="zigzag"):
    """Rank `rank`'s shard of x along `dim` (length x.shape[dim] // world_size).

    The length must be divisible by 2 * world_size (zigzag) or world_size (contiguous).
    contiguous returns a view; zigzag a new tensor (two chunks concatenated).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = dim % x.dim() if x.dim() else 0
    local_len = _local_len(x.shape[dim], world_size, layout)
    pieces = [x.narrow(dim, g, n) for g, _, n in local_chunks(local_len, rank, world_size,
                                                               layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def unshard_sequence(shards, dim, layout="zigzag"):
    """The full sequence from the shards of every rank (a list in rank order, e.g. from
    all_gather): the inverse of shard_sequence."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise ValueError("shards must be a non-empty list of tensors, one per rank in rank order")
    world_size = len(shards)
    check_layout(layout)
    ref = shards[0]
    dim = dim % ref.dim() if ref.dim() else 0
    local_len = ref.shape[dim]
    for r, s in enumerate(shards):
        if s.shape != ref.shape:
            raise ValueError(f"shards must all have one shape: shard 0 is {tuple(ref.shape)}, "
                             f"shard {r} is {tuple(s.shape)}")
    ordered = [None] * num_chunks(world_size, layout)
    for r, s in enumerate(shards):
        for g, l0, n in local_chunks(local_len, r, world_size, layout):
            ordered[g // n] = s.narrow(dim, l0, n)
    return torch.cat(ordered, dim)


def gather_sequence(x, dim, *, group=None, layout="zigzag"):
    """all_gather every rank's shard x and return the full sequence on every rank (not
    differentiable; for evaluation and tests)."""
    import torch.distributed as dist

    from . import collectives
    world_size = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world_size)]
    collectives.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, dim, layout)
