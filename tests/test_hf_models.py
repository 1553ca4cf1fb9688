"""fastattn inside Hugging Face transformers models, family by family (tiny random-weight
models built from configs, fp32): logits, greedy generation with left padding, a training
step's loss and every gradient against attn_implementation="sdpa" ("eager" for Gemma2, whose
softcap SDPA lacks), and record_dispatch() proving fastattn's CPU kernels ran attention,
norms and rotary."""

import pytest
import torch

pytest.importorskip("transformers")

import fastattn  # noqa: E402
from fastattn.integrations.transformers import record_routes  # noqa: E402
from tolerances import COMPOSED_FP32_TOL, TIGHT_FP32_TOL

from hf_models import (one_thread, FAMILIES, ROTARY_FAMILIES, build_pair, padded_batch,  # noqa: E402
                       training_step_matches)

# fp32 through two layers: kernels reorder sums (attention, norms) relative to PyTorch

_threads = pytest.fixture(autouse=True)(one_thread)


def _norm_op(family):
    return "layer_norm" if family in ("gpt2", "gpt_neox", "gptj") else "rms_norm"


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(family):
    ref, new = build_pair(family)
    for left in (False, True):
        ids, mask = padded_batch([13, 9, 4], 13, left=left)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            with fastattn.record_dispatch() as calls, record_routes() as routes:
                got = new(ids, attention_mask=mask).logits
        valid = mask.bool()                      # padded positions are free to differ
        torch.testing.assert_close(got[valid], want[valid], **COMPOSED_FP32_TOL)
        ops = {op for op, _ in calls}
        assert "attention" in ops and _norm_op(family) in ops, calls
        if family in ROTARY_FAMILIES:
            assert "rotary" in ops, calls
        assert {b for _, b in calls} == {"cpu"}, f"not all on the cpu kernels: {calls}"
        assert routes and set(routes) == {"masked"}, routes     # padding -> bool mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_left_padded(family):
    ref, new = build_pair(family)
    ids, mask = padded_batch([10, 7, 3], 10, left=True, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with record_routes() as routes, fastattn.record_dispatch() as calls:
            got = new.generate(ids, **kw)
    assert got.shape == want.shape == (3, 42)
    assert {b for _, b in calls} == {"cpu"}, calls
    if family in ROTARY_FAMILIES:                # per-row positions of left-padded rows
        assert ("rotary", "cpu") in calls
    assert torch.equal(got, want), f"{family}: generated tokens differ\n{got}\n{want}"
    assert routes.count("masked") == len(routes)   # left padding: every step has a mask


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_loss_and_grads(family):
    ref, new = build_pair(family)
    calls = training_step_matches(ref, new, family)
    assert {b for _, b in calls} == {"cpu"}, calls


def test_no_padding_uses_causal_kernel_and_decode_path():
    """Unpadded prompt: prefill runs the causal kernel without a mask, every cached decode
    step (1 query, many keys) fastattn.kvcache_attention on the cache tensors - never a dense
    masked call."""
    ref, new = build_pair("llama")
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad(), record_routes() as routes, fastattn.record_dispatch() as calls:
        got = new.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    layers = 2
    assert routes == ["dense"] * layers + ["decode"] * (4 * layers), routes
    attn = [c for c in calls if "attention" in c[0]]
    assert attn == [("attention", "cpu")] * layers + [("kvcache_attention", "cpu")] * (4 * layers)


def test_patch_contract():
    ref, new = build_pair("llama", patch=False, attn="sdpa")
    params = {n: p for n, p in new.named_parameters()}
    opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    new(torch.randint(3, 128, (1, 5)), labels=torch.randint(3, 128, (1, 5))).loss.backward()
    opt.step()
    patched = fastattn.patch(new)
    assert patched is new and new.config._attn_implementation == "fastattn"
    for n, p in new.named_parameters():
        assert p is params[n], f"{n}: a new Parameter object"
    assert all(id(p) in {id(q) for q in params.values()} for g in opt.param_groups
               for p in g["params"])
    kinds = {(old, new_) for _, old, new_ in new.fastattn_patched}
    assert ("LlamaRMSNorm", "HFRMSNorm") in kinds
    assert ("LlamaRotaryEmbedding", "FastattnLlamaRotaryEmbedding") in kinds
    assert ("LlamaAttention[sdpa]", "LlamaAttention[fastattn]") in kinds
    n_norms = sum(1 for _, old, _ in new.fastattn_patched if old == "LlamaRMSNorm")
    assert n_norms == 2 * 2 + 1                 # two per layer and the final norm
    opt.step()                                  # the optimizer still drives the same tensors
    # a second patch changes nothing
    assert fastattn.patch(new).fastattn_patched == []


def test_patch_leaves_unknown_rmsnorm_with_warning():
    import torch.nn as nn
    ref, new = build_pair("llama", patch=False, attn="sdpa")

    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(64))

        def forward(self, x):
            return x * self.weight

    MyRMSNorm.__module__ = "transformers.models.custom.modeling_custom"
    new.model.norm = MyRMSNorm()
    with pytest.warns(UserWarning, match="weight convention"):
        fastattn.patch(new)
    assert type(new.model.norm) is MyRMSNorm


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_unpatched_model_of_same_family_keeps_hf_rotary(family):
    """The wrapped apply_rotary_pos_emb only takes tables from a patched model's cos."""
    ref, new = build_pair(family)                        # patches the family's function
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        ref(ids)
    assert calls == [], calls


def test_attention_sinks_inference_match_eager():
    """gpt-oss style sinks: out * sigmoid(lse - sink) against the eager softmax with a sink
    column; training with sinks raises a clear error."""
    from fastattn.integrations.hf_attention import fastattn_attention_forward

    class M(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2
        training = False
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    sinks = torch.randn(4)
    out, _ = fastattn_attention_forward(M(), q, k, v, None, scaling=0.25, s_aux=sinks)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * 0.25
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    s = torch.cat([s, sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)], -1)
    want = (s.softmax(-1)[..., :-1] @ vv).transpose(1, 2)
    torch.testing.assert_close(out, want, **TIGHT_FP32_TOL)
    with pytest.raises(NotImplementedError, match="sinks"):
        fastattn_attention_forward(M(), q.requires_grad_(), k, v, None, s_aux=sinks)
