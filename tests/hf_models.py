"""Tiny random-weight Hugging Face models for the tests/test_hf_*.py files (never a hub
download): one config per family, built twice with the same weights, once per attention
implementation."""

import copy

import torch

VOCAB = 128


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    base.update(kw)
    return base


def config_for(family):
    """(model class, config, reference attn_implementation) of a tiny model of `family`."""
    import transformers as tf
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
        return tf.GPT2LMHeadModel, cfg, "sdpa"
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**_common()), "sdpa"
    if family == "mistral":   # a window shorter than the sequences, so it matters
        return tf.MistralForCausalLM, tf.MistralConfig(**_common(sliding_window=8)), "sdpa"
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**_common()), "sdpa"
    if family == "gemma2":    # softcap: SDPA has none, so eager is the reference
        cfg = tf.Gemma2Config(**_common(head_dim=16, sliding_window=8,
                                        attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0,
                                        query_pre_attn_scalar=16))
        return tf.Gemma2ForCausalLM, cfg, "eager"
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**_common(head_dim=16, sliding_window=8,
                                            query_pre_attn_scalar=16))
        return tf.Gemma3ForCausalLM, cfg, "sdpa"
    if family == "phi3":      # partial rotary
        cfg = tf.Phi3Config(**_common(partial_rotary_factor=0.5))
        return tf.Phi3ForCausalLM, cfg, "sdpa"
    if family == "gpt_neox":  # partial rotary, nn.LayerNorm
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=128, rotary_pct=0.25, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, hidden_dropout=0.0,
                               attention_dropout=0.0)
        return tf.GPTNeoXForCausalLM, cfg, "sdpa"
    if family == "gptj":      # GPT-J interleaved rotary on part of the head, nn.LayerNorm
        cfg = tf.GPTJConfig(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                            rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return tf.GPTJForCausalLM, cfg, "sdpa"
    raise ValueError(family)


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt_neox", "gptj")
ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt_neox", "gptj")


def build_pair(family, seed=0, attn="fastattn", patch=True):
    """(reference model, fastattn model) with identical weights, fp32, eval mode. With
    patch=True the fastattn model goes through fastattn.patch (attention, norms, rotary);
    else only attn_implementation=attn."""
    import fastattn
    from fastattn.integrations.transformers import register
    register()
    cls, cfg, ref_impl = config_for(family)
    torch.manual_seed(seed)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
    new = cls._from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
    new.load_state_dict(ref.state_dict())
    if patch:
        new = fastattn.patch(new)
    else:
        new.set_attn_implementation(attn)
    return ref, new


def padded_batch(lengths, seq, *, left, seed=1):
    """input_ids (B, seq) and attention_mask with row b holding lengths[b] real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def one_thread():
    """Fixture body: tiny models run fastest on one thread (and do not oversubscribe the
    cores another test worker uses); the previous setting is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def training_step_matches(ref, new, family):
    """One training step of `new` (patched) and `ref` on a right-padded batch: the loss and
    every parameter gradient equal within the composed fp32 bound. Returns the step's
    record_dispatch() log."""
    import fastattn
    from tolerances import COMPOSED_FP32_TOL
    ref.train()
    new.train()
    ids, mask = padded_batch([12, 8], 12, left=False, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    loss_ref = ref(ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    with fastattn.record_dispatch() as calls:
        loss = new(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    torch.testing.assert_close(loss, loss_ref, **COMPOSED_FP32_TOL)
    want = dict(ref.named_parameters())
    n = 0
    for name, p in new.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, want[name].grad, **COMPOSED_FP32_TOL,
                                   msg=lambda m: f"{family} {name}: {m}")
        n += 1
    assert n == len(want)
    return calls
