"""Seeded random-configuration fuzz of fastattn.kvcache_attention against the independent
per-sequence oracle (tests/kvcache_oracle.py), on every backend available here.

FASTATTN_FUZZ_CONFIGS (default 8) configurations from seed FASTATTN_FUZZ_SEED (default 0);
each assertion message carries the full configuration, so a failure replays with make_case.
Draws: ragged lengths incl. 0 and 1, odd head dims, Sq 1..5, appends with and without rotary
(either style), paged caches with odd block sizes or cache_batch_idx, GQA/MQA, causal or not,
windows that empty rows, softcap, huge logits, caches long enough to split, ALiBi slopes.
"""

import os
import random

import pytest
import torch
from conftest import TESTABLE_BACKENDS, backend_device
from kvcache_oracle import check, make_case

import fastattn

CONFIGS = int(os.environ.get("FASTATTN_FUZZ_CONFIGS", "8"))
SEED = int(os.environ.get("FASTATTN_FUZZ_SEED", "0"))


def draw(rng, index):
    B = rng.randint(1, 3)
    hkv = rng.choice([1, 2, 3])
    H = hkv * rng.choice([1, 2, 4])
    D = rng.choice([16, 24, 40, 64, 80])
    Sq = rng.randint(1, 5)
    s_new = rng.choice([0, 0, 1, Sq])
    long = rng.random() < 0.25
    top = 1100 if long else 60
    lens = [rng.choice([0, 1, rng.randint(0, top)]) for _ in range(B)]
    s_max = max(lens) + s_new + rng.randint(0, 5)
    layout = rng.choice(["contiguous", "paged", "batch_idx"])
    window = None
    if rng.random() < 0.3:
        window = (rng.choice([-1, 0, 3, 40]), rng.choice([-1, 0, 2]))
    rotary = None
    if s_new and rng.random() < 0.5:
        rotary = rng.choice([r for r in (8, 16, D - D % 2) if r <= D])
    return dict(B=B, Sq=Sq, H=H, Hkv=hkv, D=D, lens=tuple(lens), s_new=s_new, s_max=s_max,
                block_size=rng.choice([1, 3, 7, 16]) if layout == "paged" else None,
                cache_batch=B + rng.randint(0, 3) if layout == "batch_idx" else None,
                rotary=rotary, interleaved=rng.random() < 0.5, causal=rng.random() < 0.7,
                window=window, softcap=rng.choice([0.0, 0.0, 5.0]),
                logit_scale=rng.choice([1.0, 1.0, 30.0]),
                dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]),
                seed=SEED * 100003 + index,
                alibi=rng.choice([None, None, "head", "batch"]))   # drawn last: older draws stay


@pytest.mark.parametrize("index", range(CONFIGS))
def test_fuzz(index):
    config = draw(random.Random(SEED * 7919 + index), index)
    for backend in TESTABLE_BACKENDS:
        if backend == "cuda":
            continue                                  # no kvcache kernel in fastattn._C on CUDA
        with fastattn.use_backend(backend):
            try:
                check(make_case(**config), backend_device(backend))
            except AssertionError as e:
                raise AssertionError(f"backend {backend}, config {config}: {e}") from None
