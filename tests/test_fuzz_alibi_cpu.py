"""Seeded random-configuration fuzz of ALiBi in the C++ CPU attention kernels (dense forward/
backward, varlen forward/backward, kvcache forward, contiguous and paged) against the float64
oracle of tests/test_alibi_cpu.py: outputs, lse and gradients, with odd sizes, GQA, Sq != Sk,
both alignments, windows that empty rows and whole tiles, softcap, key_lengths, float masks,
strided inputs, empty and one-token sequences, and huge logits (scale 1e4).

  FASTATTN_FUZZ_CONFIGS=N   configs (default 40; `make fuzz` runs 1000)
  FASTATTN_FUZZ_SEED=S      base seed; config i is drawn from fuzz_support.config_rng
"""

import torch

from fuzz_support import base_seed, config_rng, num_configs
from test_alibi_cpu import run_dense_case, run_kvcache_case, run_varlen_case


def _length(rng, big=200):
    return rng.choice([1, 2, 7, 33, 64, 65, 97, 129, rng.randint(1, big)])


def _window(rng):
    if rng.random() < 0.5:
        return -1, -1
    # small left windows with Sq > Sk empty trailing rows (and whole query tiles)
    return rng.choice([-1, 0, 1, 3, rng.randint(0, 60)]), rng.choice([-1, 0, 2, rng.randint(0, 60)])


def _fuzz_config(i):
    rng, _ = config_rng("alibi_cpu", i)
    c = dict(dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
             softcap=rng.choice([0.0, 0.0, 0.0, 5.0, 30.0]),
             slope_kind=rng.choice(["per_head", "per_batch"]), seed=rng.getrandbits(31))
    huge = rng.random() < 0.15        # scale 1e4: one-hot rows, logits ~1e5
    c["scale"] = 1e4 if huge else None
    c["logit_mul"] = rng.choice([1.0, 1.0, 1.0, 4.0])
    hkv = rng.choice([1, 1, 2, 3])
    c["Hkv"], c["H"] = hkv, hkv * rng.choice([1, 2, 4])
    c["D"] = rng.choice([8, 16, 24, 40, 64, 72, 80])
    c["wl"], c["wr"] = _window(rng)
    c["causal"] = rng.random() < 0.5
    kind = rng.choice(["dense", "dense", "varlen", "kvcache"])
    if kind == "dense":
        c.update(B=rng.choice([1, 2, 3]), Sq=_length(rng), Sk=_length(rng, 300),
                 bottom_right=rng.random() < 0.5, key_lengths=rng.random() < 0.2,
                 float_mask=rng.random() < 0.15, seq_major=rng.random() < 0.3)
    elif kind == "varlen":
        nb = rng.choice([1, 2, 4])
        c["lens_q"] = [rng.choice([0, 1, _length(rng, 150)]) for _ in range(nb)]
        c["lens_k"] = [rng.choice([0, 1, _length(rng, 150)]) for _ in range(nb)]
        if not any(c["lens_q"]):
            c["lens_q"][0] = 5
    else:
        B = rng.choice([1, 2, 3])
        c["s_new"] = rng.choice([0, 0, 1, 3])
        c["Sq"] = rng.choice([1, 1, 2, 5]) if c["s_new"] == 0 else c["s_new"]
        c["lens"] = [rng.choice([0, 1, rng.randint(0, 300), rng.randint(200, 800)])
                     for _ in range(B)]
        c["block_size"] = rng.choice([None, 1, 5, 16, 64])
        c["causal"] = rng.random() < 0.8
    return kind, c


def test_fuzz_alibi_cpu():
    """Seeded random configurations of every CPU path with ALiBi: outputs, lse and (dense,
    varlen) gradients against the float64 oracle."""
    bad = []
    n = num_configs(40)
    for i in range(n):
        kind, c = _fuzz_config(i)
        run = {"dense": run_dense_case, "varlen": run_varlen_case,
               "kvcache": run_kvcache_case}[kind]
        try:
            run(**c)
        except Exception as exc:  # noqa: BLE001  (a config that raises is a failure too)
            bad.append(f"config #{i} ({kind}): {exc}")
    assert not bad, (f"{len(bad)} of {n} configs failed (FASTATTN_FUZZ_SEED={base_seed()}):\n"
                     + "\n".join(bad[:10]))
