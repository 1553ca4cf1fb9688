"""fastattn's in-place KV cache for transformers' generate (fastattn/integrations/hf_cache.py):
GrowingLayer against transformers' own DynamicLayer over seeded random sequences of cache
operations, the autograd fallback, and generate on a patched model (tokens identical to the
unpatched model's, the cache it built appends in place, a caller's cache left alone)."""

import random

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

import fastattn  # noqa: E402
from fastattn.integrations.hf_cache import (  # noqa: E402
    growing_cache_class, growing_layer_class, make_growing)
from hf_models import build_pair, one_thread  # noqa: E402
from tolerances import COMPOSED_FP32_TOL  # noqa: E402

_threads = pytest.fixture(autouse=True)(one_thread)


def _states(rng, b, h, n, d, dtype=torch.float32):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype),
            torch.randn(b, h, n, d + 1, generator=g, dtype=dtype))   # V head dim may differ


@pytest.mark.parametrize("seed", range(12))
def test_growing_layer_matches_dynamic_layer(seed):
    """Seeded random operation sequences (prefill, single and multi-token appends, crop,
    batch selection, beam reorder, repeat_interleave, reset): after every operation the
    growing layer holds exactly what transformers' DynamicLayer holds."""
    rng = random.Random(seed)
    b, h, d = rng.randint(1, 3), rng.randint(1, 3), rng.choice([4, 8])
    ours, ref = growing_layer_class()(), DynamicLayer()
    buffers = set()
    for step in range(40):
        length = ref.get_seq_length()
        op = rng.random()
        if op < 0.06 and length > 1:
            n = -rng.randint(1, length - 1)
            ours.crop(n), ref.crop(n)
        elif op < 0.1 and length:
            idx = torch.tensor(sorted(rng.sample(range(b), rng.randint(1, b))))
            ours.batch_select_indices(idx), ref.batch_select_indices(idx)
            b = idx.numel()
        elif op < 0.14 and length:
            beam = torch.tensor([rng.randrange(b) for _ in range(b)])
            ours.reorder_cache(beam), ref.reorder_cache(beam)
        elif op < 0.17 and length and b < 4:
            ours.batch_repeat_interleave(2), ref.batch_repeat_interleave(2)
            b *= 2
        elif op < 0.19:
            ours.reset(), ref.reset()
        else:
            n = rng.choice([1, 1, 1, 2, 5]) if length else rng.randint(1, 20)
            k, v = _states(rng, b, h, n, d)
            got = ours.update(k, v)
            want = ref.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
            buffers.add(ours._key_buffer.data_ptr())
        assert ours.get_seq_length() == ref.get_seq_length(), step
        if ref.get_seq_length():
            assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)


def test_appends_write_in_place_and_regrow_geometrically():
    layer = growing_layer_class()()
    rng = random.Random(0)
    k, v = _states(rng, 2, 2, 100, 8)
    layer.update(k, v)
    first = layer.keys
    pointers = {layer._key_buffer.data_ptr()}
    for _ in range(400):
        k, v = _states(rng, 2, 2, 1, 8)
        keys, values = layer.update(k, v)
        pointers.add(layer._key_buffer.data_ptr())
        assert keys.data_ptr() == layer._key_buffer.data_ptr()
        assert torch.equal(keys[:, :, -1:], k) and torch.equal(values[:, :, -1:], v)
    assert layer.get_seq_length() == 500
    assert len(pointers) <= 4        # 100 -> 200 -> 400 -> 800 slots: 3 regrowths in 400 steps
    assert torch.equal(first, layer.keys[:, :, :100])   # earlier views are never overwritten


def test_grad_mode_concatenates_so_backward_works():
    layer = growing_layer_class()()
    k1 = torch.randn(1, 2, 3, 4, requires_grad=True)
    v1 = torch.randn(1, 2, 3, 4, requires_grad=True)
    k2 = torch.randn(1, 2, 1, 4, requires_grad=True)
    layer.update(k1, v1)
    keys, values = layer.update(k2, k2 * 2)
    (keys.sum() + values.square().sum()).backward()
    assert torch.equal(k1.grad, torch.ones_like(k1))
    assert torch.allclose(k2.grad, 1 + 8 * k2.detach())
    with torch.no_grad():                       # back in place once nothing needs grad
        layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert layer._key_buffer is not None and layer.get_seq_length() == 5


def test_dtype_change_reallocates_as_cat_promotes():
    ours, ref = growing_layer_class()(), DynamicLayer()
    for layer in (ours, ref):
        layer.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
        keys, values = layer.update(torch.full((1, 1, 1, 4), 0.1, dtype=torch.float64),
                                    torch.full((1, 1, 1, 4), 0.1, dtype=torch.float64))
    assert ours.keys.dtype == ref.keys.dtype == torch.float64
    assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)


def test_growing_cache_class_and_make_growing():
    ref, new = build_pair("llama")
    cache = growing_cache_class()(config=new.config)
    assert all(type(layer) is growing_layer_class() for layer in cache.layers)
    plain = DynamicCache(config=new.config)
    assert make_growing(plain) is plain
    assert all(type(layer) is growing_layer_class() for layer in plain.layers)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = new.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           cache=growing_cache_class()(config=new.config))
    assert torch.equal(got, want)


def test_patched_generate_builds_a_growing_cache():
    ref, new = build_pair("llama")
    assert ("generate", "DynamicCache", "GrowingCache") in new.fastattn_patched
    ids = torch.randint(3, 128, (3, 9))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = new.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache = got.cache if hasattr(got, "cache") else got.past_key_values
    assert type(cache) is DynamicCache
    assert {type(layer) for layer in cache.layers} == {growing_layer_class()}
    assert cache.layers[0]._key_buffer.shape[2] >= cache.get_seq_length() == 9 + 11
    ref_cache = want.cache if hasattr(want, "cache") else want.past_key_values
    for a, b in zip(cache.layers, ref_cache.layers):     # kernels round differently from HF
        torch.testing.assert_close(a.keys, b.keys, **COMPOSED_FP32_TOL)
        torch.testing.assert_close(a.values, b.values, **COMPOSED_FP32_TOL)


def test_callers_cache_and_static_cache_are_left_alone():
    _, new = build_pair("llama")
    ids = torch.randint(3, 128, (1, 5))
    mine = DynamicCache(config=new.config)
    with torch.no_grad():
        new.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache=mine)
        out = new.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           cache_implementation="static", return_dict_in_generate=True)
    assert {type(layer) for layer in mine.layers} == {DynamicLayer}
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert growing_layer_class() not in {type(layer) for layer in cache.layers}


def test_patch_twice_installs_once():
    _, new = build_pair("llama")
    hook = new._prepare_cache_for_generation
    again = fastattn.patch(new)
    assert again._prepare_cache_for_generation is hook
