"""Context parallelism: attention over a sequence sharded across torch.distributed ranks.

    import fastattn.distributed as fd
    q, k, v = (fd.shard_sequence(t, 2, rank, world, "zigzag") for t in (q_full, k_full, v_full))
    out = fd.context_parallel_attention(q, k, v, is_causal=True)   # this rank's shard
    full = fd.unshard_sequence(list_of_every_ranks_out, 2, "zigzag")

Not imported by `import fastattn` (it needs torch.distributed); import it explicitly.
"""

from .local import RankFailure, run_local
from .ring import context_parallel_attention, rank_work
from .sharding import (LAYOUTS, gather_sequence, local_chunks, shard_positions, shard_sequence,
                       unshard_sequence)

__all__ = ["context_parallel_attention", "shard_sequence", "unshard_sequence",
           "gather_sequence", "shard_positions", "local_chunks", "rank_work", "LAYOUTS",
           "run_local", "RankFailure"]
