"""fastattn.patch on the gated SiLU MLPs of Hugging Face models (LlamaMLP, MistralMLP, Qwen2MLP,
Qwen3MLP -> fastattn.swiglu; fastattn/integrations/hf_mlp.py): tiny random-weight models built
from configs, fp32, against attn_implementation="sdpa": logits, a training step's loss and
every parameter gradient, greedy generation, record_dispatch() showing swiglu on the cpu
kernel, the patch contract (same Parameter objects), and the modules it must leave alone."""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import fastattn  # noqa: E402
from tolerances import COMPOSED_FP32_TOL  # noqa: E402

from hf_models import (_common, build_pair, config_for, one_thread, padded_batch,  # noqa: E402
                       training_step_matches)

_threads = pytest.fixture(autouse=True)(one_thread)

MLP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MLP_CLASS = {"llama": "LlamaMLP", "mistral": "MistralMLP", "qwen2": "Qwen2MLP",
             "qwen3": "Qwen3MLP"}
LAYERS = 2


def _pair(family, seed=0):
    """(sdpa reference, patched model) with the same weights; Qwen3 is built here (tests/
    hf_models.py has no Qwen3 config)."""
    if family != "qwen3":
        return build_pair(family, seed=seed)
    import transformers as tf
    from fastattn.integrations.transformers import register
    register()
    cfg = tf.Qwen3Config(**_common(head_dim=16))
    torch.manual_seed(seed)
    ref = tf.Qwen3ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    new = tf.Qwen3ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    new.load_state_dict(ref.state_dict())
    return ref, fastattn.patch(new)


def _swiglu_calls(calls):
    return [c for c in calls if c[0] == "swiglu"]


@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_patched_mlp_logits_and_dispatch(family):
    ref, new = _pair(family)
    mlps = [m for n, m in new.named_modules() if n.endswith(".mlp")]
    assert len(mlps) == LAYERS
    assert all(type(m).__name__ == f"Fastattn{MLP_CLASS[family]}" for m in mlps)
    ids, mask = padded_batch([13, 9, 4], 13, left=True)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        with fastattn.record_dispatch() as calls:
            got = new(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], **COMPOSED_FP32_TOL)
    assert _swiglu_calls(calls) == [("swiglu", "cpu")] * LAYERS, calls
    assert {b for _, b in calls} == {"cpu"}, calls


@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_patched_mlp_training_step_grads(family):
    ref, new = _pair(family)
    calls = training_step_matches(ref, new, family)
    assert _swiglu_calls(calls) == [("swiglu", "cpu")] * LAYERS, calls


@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_patched_mlp_greedy_generation(family):
    ref, new = _pair(family)
    ids, mask = padded_batch([10, 7, 3], 10, left=True, seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with fastattn.record_dispatch() as calls:
            got = new.generate(ids, **kw)
    assert torch.equal(got, want), f"{family}: generated tokens differ\n{got}\n{want}"
    assert len(_swiglu_calls(calls)) == LAYERS * 24      # prefill + 23 decode steps
    assert {b for _, b in calls} == {"cpu"}, calls


def test_mlp_patch_contract():
    ref, new = build_pair("llama", patch=False, attn="sdpa")
    params = {n: p for n, p in new.named_parameters()}
    linears = {n: m for n, m in new.named_modules() if isinstance(m, nn.Linear)}
    keys = list(new.state_dict())
    fastattn.patch(new)
    for n, p in new.named_parameters():
        assert p is params[n], f"{n}: a new Parameter object"
    for n, m in new.named_modules():
        if isinstance(m, nn.Linear):
            assert m is linears[n], f"{n}: a new Linear"
    assert list(new.state_dict()) == keys
    mlp_entries = [e for e in new.fastattn_patched if e[1] == "LlamaMLP"]
    assert mlp_entries == [(f"model.layers.{i}.mlp", "LlamaMLP", "FastattnLlamaMLP")
                           for i in range(LAYERS)]
    import transformers as tf
    assert isinstance(new.model.layers[0].mlp, tf.models.llama.modeling_llama.LlamaMLP)
    assert fastattn.patch(new).fastattn_patched == []             # a second patch: nothing


def test_gemma_gelu_mlp_is_left_alone():
    ref, new = build_pair("gemma3")
    mlp = new.model.layers[0].mlp
    assert type(mlp).__name__ == "Gemma3MLP"
    assert not [e for e in new.fastattn_patched if "MLP" in e[1]]
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        new(torch.randint(3, 128, (1, 6)))
    assert not _swiglu_calls(calls)


def test_mlp_with_other_activation_or_hooks_is_left_alone_with_a_warning():
    import transformers as tf
    cls, cfg, _ = config_for("llama")
    cfg = copy.deepcopy(cfg)
    cfg.hidden_act = "gelu"
    model = cls._from_config(cfg, attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match="activation is GELUActivation, not SiLU"):
        fastattn.patch(model)
    assert type(model.model.layers[0].mlp) is tf.models.llama.modeling_llama.LlamaMLP

    ref, new = build_pair("llama", patch=False, attn="sdpa")
    new.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    new.model.layers[1].mlp.act_fn.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning) as warned:
        fastattn.patch(new)
    text = " ".join(str(w.message) for w in warned)
    assert "model.layers.0.mlp (LlamaMLP) unchanged: it has hooks registered" in text
    assert "model.layers.1.mlp (LlamaMLP) unchanged: its act_fn has hooks" in text
    assert type(new.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert type(new.model.layers[1].mlp).__name__ == "LlamaMLP"


def test_patched_mlp_forward_is_swiglu_of_the_same_projections():
    """The fused forward against the module's own HF forward, on one MLP, fp32 and bf16."""
    ref, new = build_pair("llama")
    mlp_ref, mlp = ref.model.layers[0].mlp, new.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(mlp(x), mlp_ref(x), **COMPOSED_FP32_TOL)
