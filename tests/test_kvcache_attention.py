"""fastattn.kvcache_attention on every backend against an independent per-sequence oracle
(tests/kvcache_oracle.py): ragged lengths, GQA/MQA, causal/window/softcap, paged caches,
cache_batch_idx, in-place append with rotary, split-K; bad input; torch.compile; dispatch."""

import pytest
import torch
from conftest import backend_device
from kvcache_oracle import check, make_case

import fastattn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


RAGGED = ([(dt, 1, 1) for dt in DTYPES] + [(dt, 3, 3) for dt in DTYPES]
          + [(torch.float32, 1, 0), (torch.float32, 4, 0), (torch.float32, 2, 5)])


@pytest.mark.parametrize("dtype,sq,s_new", RAGGED)
def test_ragged_decode(backend, dtype, sq, s_new):
    # lengths 0 and 1 included; Sq > L_b rows near the front are empty (bottom-right causal)
    check(make_case(B=4, Sq=sq, H=6, Hkv=2, D=40, lens=(0, 1, 13, 37), s_new=s_new,
                    s_max=45, dtype=dtype, seed=sq * 10 + s_new), backend_device(backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["noncausal", "window", "softcap", "scale"])
def test_modes_gqa_mqa(backend, dtype, mode):
    hkv = 1 if mode in ("noncausal", "softcap") else 4           # MQA / GQA (group 2)
    kw = dict(noncausal=dict(causal=False), window=dict(window=(5, 0)),
              softcap=dict(softcap=3.0, logit_scale=4.0), scale=dict(scale=0.3))[mode]
    check(make_case(B=3, Sq=2, H=8, Hkv=hkv, D=64, lens=(3, 20, 0), s_new=2, dtype=dtype,
                    seed=hkv, **kw), backend_device(backend))


@pytest.mark.parametrize("dtype,block_size", [(dt, 3) for dt in DTYPES]
                         + [(torch.float32, 1), (torch.float32, 16)])
def test_paged_shuffled(backend, dtype, block_size):
    check(make_case(B=3, Sq=2, H=4, Hkv=2, D=32, lens=(0, 11, 29), s_new=2, s_max=40,
                    block_size=block_size, dtype=dtype, seed=block_size),
          backend_device(backend))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_batch_idx(backend, dtype):
    check(make_case(B=3, Sq=1, H=4, Hkv=1, D=16, lens=(4, 0, 9), s_new=1, s_max=12,
                    cache_batch=5, dtype=dtype), backend_device(backend))


ROTARY_MODES = [(True, None, False), (False, None, True), (False, (4, 2), False)]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("mode", range(len(ROTARY_MODES)))
def test_append_rotary(backend, interleaved, mode):
    causal, window, paged = ROTARY_MODES[mode]
    dtype = DTYPES[(mode + interleaved) % 3]                     # each dtype twice
    # non-causal without window: flash-attn rotates every query at cache_seqlens[b]
    check(make_case(B=2, Sq=3, H=4, Hkv=2, D=48, lens=(0, 9), s_new=3, s_max=20,
                    rotary=32, interleaved=interleaved, causal=causal, window=window,
                    block_size=5 if paged else None, dtype=dtype, seed=int(interleaved)),
          backend_device(backend))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_cache_split_k(backend, dtype):
    # long enough for the CPU kernel's and the Triton launcher's cache splits
    check(make_case(B=2, Sq=1, H=8, Hkv=2, D=64, lens=(1500, 700), s_new=1, s_max=1600,
                    block_size=64 if dtype == torch.float16 else None, window=(900, 0)
                    if dtype == torch.bfloat16 else None, dtype=dtype, seed=3),
          backend_device(backend))


def test_empty_rows_give_zero(backend):
    # window right of every key and an empty cache: out 0, lse -inf
    case = make_case(B=2, Sq=2, H=2, Hkv=1, D=16, lens=(0, 5), s_new=0, s_max=8,
                     window=(0, 0), causal=True)
    out, lse = check(case, backend_device(backend))
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


def test_no_new_keys_leaves_cache(backend):
    dev = backend_device(backend)
    case = make_case(B=2, Sq=1, lens=(3, 4), s_max=6)
    kc, vc = case.k_cache.clone().to(dev), case.v_cache.clone().to(dev)
    with torch.no_grad():
        fastattn.kvcache_attention(case.q.to(dev), kc, vc, cache_seqlens=case.cache_seqlens.to(dev))
    assert torch.equal(kc.cpu(), case.k_cache) and torch.equal(vc.cpu(), case.v_cache)


def test_int_cache_seqlens_and_default_return(backend):
    dev = backend_device(backend)
    case = make_case(B=2, Sq=1, lens=(5, 5), s_max=8)
    q, kc, vc = case.q.to(dev), case.k_cache.to(dev), case.v_cache.to(dev)
    a = fastattn.kvcache_attention(q, kc, vc, cache_seqlens=5)
    b = fastattn.kvcache_attention(q, kc, vc, cache_seqlens=case.cache_seqlens.to(dev))
    assert isinstance(a, torch.Tensor)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ dispatch, compile, errors

def test_record_dispatch(backend):
    dev = backend_device(backend)
    case = make_case(B=1, Sq=1, lens=(3,), s_max=4)
    with fastattn.record_dispatch() as calls:
        fastattn.kvcache_attention(case.q.to(dev), case.k_cache.to(dev), case.v_cache.to(dev),
                                   cache_seqlens=case.cache_seqlens.to(dev))
    assert ("kvcache_attention", backend) in calls


def test_auto_picks_cpu_kernel():
    if fastattn._backend.unavailable_reason("cpu", "cpu") is not None:
        pytest.fail("the cpu backend must be built for this test (make build)")
    case = make_case(B=1, Sq=1, lens=(3,), s_max=4)
    with fastattn.record_dispatch() as calls:
        fastattn.kvcache_attention(case.q, case.k_cache, case.v_cache,
                                   cache_seqlens=case.cache_seqlens)
    assert calls == [("kvcache_attention", "cpu")]


def test_compile_fullgraph_appends():
    case = make_case(B=2, Sq=1, H=4, Hkv=2, D=16, lens=(2, 5), s_new=1, s_max=8, rotary=8)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k_cache, v_cache, k, v, lens, cos, sin):
        return fastattn.kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                          rotary_cos=cos, rotary_sin=sin) * 2

    out = step(case.q, kc, vc, case.k, case.v, case.cache_seqlens, case.cos, case.sin)
    kc2, vc2 = case.k_cache.clone(), case.v_cache.clone()
    want = fastattn.kvcache_attention(case.q, kc2, vc2, case.k, case.v,
                                      cache_seqlens=case.cache_seqlens, rotary_cos=case.cos,
                                      rotary_sin=case.sin) * 2
    torch.testing.assert_close(out, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)        # the append happened in place


def _base(**kw):
    case = make_case(B=2, Sq=1, H=4, Hkv=2, D=16, lens=(2, 5), s_new=1, s_max=8)
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, k=case.k, v=case.v,
                cache_seqlens=case.cache_seqlens)
    args.update(kw)
    return args


def _call(args):
    return fastattn.kvcache_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                      args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(cache_seqlens=torch.tensor([2, 8], dtype=torch.int32)), "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32)), "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([2, 5])), "cache_seqlens"),          # int64
    (dict(cache_seqlens=torch.tensor([2], dtype=torch.int32)), "cache_seqlens"),
    (dict(k_cache=torch.randn(2, 8, 3, 16), v_cache=torch.randn(2, 8, 3, 16),
          k=None, v=None), "heads"),
    (dict(k_cache=torch.randn(2, 8, 2, 16).half()), "k_cache"),
    (dict(v_cache=torch.randn(2, 9, 2, 16)), "v_cache"),
    (dict(k=torch.randn(2, 1, 2, 8)), "k"),
    (dict(v=None), "k and v"),
    (dict(k_cache=torch.randn(3, 8, 2, 16), v_cache=torch.randn(3, 8, 2, 16)), "batch"),
    (dict(cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32)), "cache_batch_idx"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int64)), "block_table"),
    (dict(rotary_cos=torch.ones(8, 4)), "rotary_sin"),
    (dict(rotary_cos=torch.ones(8, 12), rotary_sin=torch.ones(8, 12)), "rotary_cos"),
    (dict(rotary_cos=torch.ones(4, 4), rotary_sin=torch.ones(4, 4)), "rotary_cos"),
    (dict(softcap=-1.0), "softcap"),
    (dict(window=(1, 2, 3)), "window"),
])
def test_bad_input(kw, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        _call(_base(**kw))


def test_bad_block_table_and_paged_capacity():
    case = make_case(B=2, Sq=1, H=2, Hkv=1, D=16, lens=(3, 9), s_new=1, s_max=12,
                     block_size=4)
    bt = case.block_table.clone()
    n_blocks = case.k_cache.shape[0]
    bt[1, 1] = n_blocks                                            # a page this call reads
    with pytest.raises(ValueError, match="block_table"):
        fastattn.kvcache_attention(case.q, case.k_cache, case.v_cache, case.k, case.v,
                                   cache_seqlens=case.cache_seqlens, block_table=bt)
    bt = case.block_table.clone()
    bt[0, 2] = -1                                                  # unused page: allowed
    fastattn.kvcache_attention(case.q, case.k_cache.clone(), case.v_cache.clone(), case.k,
                               case.v, cache_seqlens=case.cache_seqlens, block_table=bt)
    with pytest.raises(ValueError, match="max_blocks"):
        fastattn.kvcache_attention(case.q, case.k_cache, case.v_cache, case.k, case.v,
                                   cache_seqlens=torch.tensor([3, 12], dtype=torch.int32),
                                   block_table=case.block_table)


def test_requires_grad_is_refused():
    q = _base()["q"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference only"):
        _call(_base(q=q))
    with torch.no_grad():
        _call(_base(q=q))


def test_cpu_entry_checks_bounds():
    """The C++ op checks every index itself (the public checks can be bypassed under
    torch.compile): no out-of-bounds read whatever the caller passes."""
    ops = torch.ops.fastattn_kernels
    q = torch.randn(2, 1, 2, 16)
    kc = torch.randn(5, 4, 1, 16)
    lens = torch.tensor([3, 2], dtype=torch.int32)
    good_bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    ops.kvcache_attention_forward(q, kc, kc, lens, good_bt, None, 1, 1.0, True, -1, -1, 0.0)
    for bt, n, match in ((torch.tensor([[0, 5], [2, 3]], dtype=torch.int32), 2, "block_table"),
                         (good_bt, 6, "cache_seqlens"),
                         (good_bt.long(), 1, "int32")):
        with pytest.raises(RuntimeError, match=match):
            ops.kvcache_attention_forward(q, kc, kc, lens, bt, None, n, 1.0, True, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="cache_batch_idx"):
        ops.kvcache_attention_forward(q, kc, kc, lens, None, torch.tensor([0, 5], dtype=torch.int32),
                                      0, 1.0, True, -1, -1, 0.0)
