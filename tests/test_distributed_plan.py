"""Single-process checks of fastattn.distributed's sharding and ring plan (no process group):
the per-pair kernel calls see exactly the keys global-position visibility allows, shards
round-trip, and zigzag balances causal work across ranks."""

import random

import pytest
import torch

import fastattn.distributed as fd
from fastattn import reference
from fastattn.distributed import plan


def test_block_calls_match_brute_force_visibility():
    rng = random.Random(0)
    for _ in range(1500):
        qn, kn = rng.randint(1, 9), rng.randint(1, 9)
        qg, kg = rng.randint(0, 20), rng.randint(0, 20)
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 1, 3, 7]), rng.choice([-1, 0, 2, 5]))
        p = torch.arange(qg, qg + qn).view(-1, 1)            # query positions
        pk = torch.arange(kg, kg + kn).view(1, -1)           # key positions
        want = torch.ones(qn, kn, dtype=torch.bool)
        if causal:
            want &= pk <= p
        if window[0] >= 0:
            want &= pk >= p - window[0]
        if window[1] >= 0:
            want &= pk <= p + window[1]
        got = torch.zeros(qn, kn, dtype=torch.bool)
        call = plan.block_call(qg, 0, qn, kg, 0, kn, causal, window)
        if call is not None:
            sub = reference.attention_visibility(call.q_end - call.q_start,
                                                 call.k_end - call.k_start,
                                                 causal=call.is_causal,
                                                 window_left=call.window[0],
                                                 window_right=call.window[1])
            got[call.q_start:call.q_end, call.k_start:call.k_end] = sub
            assert plan.visible_pairs(call) == int(sub.sum())
            # tight: every row of the call sees a key and every key is seen by a row
            assert sub.any(1).all() and sub.any(0).all(), (qg, qn, kg, kn, causal, window)
        assert torch.equal(got, want), (qg, qn, kg, kn, causal, window, call)


@pytest.mark.parametrize("layout", fd.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, world):
    x = torch.arange(3 * 24 * 2).view(3, 24, 2)
    shards = [fd.shard_sequence(x, 1, r, world, layout) for r in range(world)]
    assert torch.equal(fd.unshard_sequence(shards, 1, layout), x)
    for r, s in enumerate(shards):
        assert torch.equal(s[0, :, 0] // 2, fd.shard_positions(24, r, world, layout))
    if layout == "zigzag" and world == 2:
        assert fd.shard_positions(8, 0, 2).tolist() == [0, 1, 6, 7]


def test_bad_sharding_arguments():
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        fd.shard_sequence(x, 1, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        fd.shard_sequence(x, 1, 0, 2, "striped")
    with pytest.raises(ValueError, match="rank"):
        fd.shard_sequence(x, 1, 2, 2, "contiguous")
    with pytest.raises(ValueError, match="one shape"):
        fd.unshard_sequence([x, x[:, :4]], 1)


def test_every_rank_covers_every_visible_pair():
    """Over all ranks and steps the calls compute each visible (query, key) pair once."""
    for world, layout, causal, window in [(2, "zigzag", True, None), (4, "zigzag", True, None),
                                          (3, "contiguous", True, (5, -1)),
                                          (2, "contiguous", False, (3, 2))]:
        s = 24
        total = sum(fd.rank_work(s, world, layout, is_causal=causal, window=window))
        vis = reference.attention_visibility(s, s, causal=causal,
                                             window_left=-1 if window is None else window[0],
                                             window_right=-1 if window is None else window[1])
        assert total == int(vis.sum()), (world, layout, causal, window)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_causal_work(world):
    """Per-rank attention FLOPs (visible pairs; deterministic) within 10% of each other for
    zigzag causal; the contiguous split is far from balanced (the reason zigzag exists)."""
    seq = 8192
    zig = fd.rank_work(seq, world, "zigzag", is_causal=True)
    assert max(zig) <= 1.10 * min(zig), zig
    contiguous = fd.rank_work(seq, world, "contiguous", is_causal=True)
    assert max(contiguous) > 2 * min(contiguous), contiguous
