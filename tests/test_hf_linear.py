"""fastattn.patch on the nn.Linear layers of Hugging Face models (fastattn/integrations/
hf_linear.py): decode-sized CPU calls (<= 16 rows, no gradient) run fastattn.linear's
skinny-GEMM kernel, everything else nn.Linear's F.linear. Tiny random-weight models, fp32,
against the unpatched sdpa model: greedy generation, a decode step's logits, the dispatch log
(which calls took the kernel), the patch contract (same Parameter objects, tied lm_head), and
the modules it must leave alone (hooked Linears, GPT-2's Conv1D)."""

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fastattn  # noqa: E402
from tolerances import COMPOSED_FP32_TOL  # noqa: E402

from hf_models import build_pair, config_for, one_thread, padded_batch  # noqa: E402

_threads = pytest.fixture(autouse=True)(one_thread)

LINEAR_FAMILIES = ("llama", "qwen2", "gemma2", "phi3", "gpt_neox", "gptj")   # qwen2: biases


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _linear_calls(calls):
    return [c for c in calls if c[0] == "linear"]


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_every_linear_switched_with_same_parameters(family):
    cls, cfg, ref_impl = config_for(family)
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=ref_impl).eval()
    before = {n: (m.weight, m.bias) for n, m in _linears(model)}
    keys = list(model.state_dict())
    fastattn.patch(model)
    after = _linears(model)
    assert [n for n, _ in after] == list(before)
    for name, m in after:
        assert type(m).__name__ == "FastattnLinear", name
        assert m.weight is before[name][0] and m.bias is before[name][1], name
    assert list(model.state_dict()) == keys
    patched = {q for q, old, new in model.fastattn_patched if new == "FastattnLinear"}
    assert patched == set(before)
    if getattr(cfg, "tie_word_embeddings", False):
        assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", LINEAR_FAMILIES)
def test_decode_linears_run_the_kernel_and_generation_is_unchanged(family):
    ref, new = build_pair(family)
    ids, mask = padded_batch([10, 7, 3], 10, left=True, seed=3)
    steps = 12
    kw = dict(attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with fastattn.record_dispatch() as calls:
            got = new.generate(ids, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    linear = _linear_calls(calls)
    # every Linear of every decode step (3 rows) on the cpu kernel; the prefill's 30 rows
    # stay on F.linear (unlogged) except the last-token lm_head (3 rows)
    per_step = len(_linears(new))
    assert len(linear) == (steps - 1) * per_step + 1, (len(linear), per_step)
    assert set(linear) == {("linear", "cpu")}


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_decode_step_logits(family):
    ref, new = build_pair(family)
    ids, mask = padded_batch([9, 6], 9, left=True, seed=4)
    with torch.no_grad():
        out_ref = ref(ids, attention_mask=mask, use_cache=True)
        out_new = new(ids, attention_mask=mask, use_cache=True)
        nxt = out_ref.logits[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        want = ref(nxt, attention_mask=mask2, past_key_values=out_ref.past_key_values).logits
        with fastattn.record_dispatch() as calls:
            got = new(nxt, attention_mask=mask2, past_key_values=out_new.past_key_values).logits
    torch.testing.assert_close(got, want, **COMPOSED_FP32_TOL)
    assert set(_linear_calls(calls)) == {("linear", "cpu")}


def test_prefill_training_and_other_backends_keep_f_linear():
    ref, new = build_pair("llama")
    ids, mask = padded_batch([12, 12], 12, left=False)      # 24 rows: past the kernel's 16
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        new(ids, attention_mask=mask)
    assert _linear_calls(calls) == []
    one = ids[:, :1]                                         # 2 rows, but gradients needed
    with fastattn.record_dispatch() as calls:
        new(one).logits.sum().backward()
    assert _linear_calls(calls) == []
    assert all(p.grad is not None for p in new.parameters() if p.requires_grad)
    with torch.no_grad(), fastattn.use_backend("torch"), fastattn.record_dispatch() as calls:
        got = new(one).logits
    assert _linear_calls(calls) == []
    with torch.no_grad():
        torch.testing.assert_close(got, ref(one).logits, **COMPOSED_FP32_TOL)


def test_hooked_linear_left_alone_and_gpt2_conv1d_untouched():
    cls, cfg, ref_impl = config_for("llama")
    model = cls._from_config(cfg, attn_implementation=ref_impl).eval()
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    q.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(UserWarning, match=r"q_proj.*hooks"):
        fastattn.patch(model)
    assert type(q) is nn.Linear
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "FastattnLinear"
    with torch.no_grad():
        model(torch.tensor([[5, 6]]))
    assert seen == [torch.Size([1, 2, 64])]

    from transformers.pytorch_utils import Conv1D
    cls, cfg, ref_impl = config_for("gpt2")
    gpt2 = cls._from_config(cfg, attn_implementation=ref_impl).eval()
    convs = [n for n, m in gpt2.named_modules() if type(m) is Conv1D]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastattn.patch(gpt2)
    assert convs and all(type(gpt2.get_submodule(n)) is Conv1D for n in convs)
    assert type(gpt2.lm_head).__name__ == "FastattnLinear"
