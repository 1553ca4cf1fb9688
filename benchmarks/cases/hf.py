"""Hugging Face transformers cases: a Llama-style model (hidden 512, 8 heads, 2 KV heads,
4 layers, random weights from a config) run by transformers with fastattn.patch(model)
(attention, RMSNorm and rotary on fastattn's kernels) against the same model with
attn_implementation="sdpa".

  train     one training step (forward + backward) on B=4, S=512        -> tokens/s ratio
  generate  greedy generation of 64 tokens from a 512-token prompt, B=4  -> tokens/s ratio
  packed    one training step on sequences of lengths 64..1024, packed padding-free
            (DataCollatorWithFlattening, varlen attention) against the padded sdpa step
            on the same tokens

The ratio (torch time / fastattn time) is the tokens/s ratio: both sides process the same
tokens. Needs transformers (pip install 'fastattn[transformers]'); without it the cases are
reported unavailable.
"""

import copy

import torch

from .common import Case, Pair

CONFIG = dict(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
              pad_token_id=0, attention_dropout=0.0)
PACKED_LENGTHS = (64, 1024, 200, 512, 96, 700, 128, 300)


def _models(device, dtype, train):
    import fastattn
    import transformers as tf
    cfg = tf.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    ref = tf.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours = tf.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    ours.load_state_dict(ref.state_dict())
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    fastattn.patch(ours)
    for m in (ref, ours):
        m.train(train)
    return ours, ref


def _train_step(model, batch):
    def call():
        for p in model.parameters():
            p.grad = None
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()
    return call


def _generate(model, ids, mask, new_tokens):
    def call():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].float()
    return call


def _ids(b, s, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, CONFIG["vocab_size"], (b, s), generator=g).to(device)


def _case_train(b, s, dtype, backend):
    def build(device):
        ours, ref = _models(device, dtype, True)
        ids = _ids(b, s, device)
        batch = {"input_ids": ids, "labels": ids}
        return Pair(_with_backend(backend, _train_step(ours, batch)), _train_step(ref, batch))
    return Case(op="hf", variant="llama-train", shape={"B": b, "S": s}, dtype=dtype,
                direction="fwd+bwd", backend=backend, baseline="transformers sdpa",
                build=build, flops=0.0, bytes=0.0, bound="compute", compare_tol=1e-3)


def _case_generate(b, prompt, new_tokens, dtype, backend):
    def build(device):
        ours, ref = _models(device, dtype, False)
        ids = _ids(b, prompt, device)
        mask = torch.ones_like(ids)
        return Pair(_with_backend(backend, _generate(ours, ids, mask, new_tokens)),
                    _generate(ref, ids, mask, new_tokens))
    return Case(op="hf", variant="llama-generate",
                shape={"B": b, "prompt": prompt, "new": new_tokens}, dtype=dtype,
                direction="fwd", backend=backend, baseline="transformers sdpa generate",
                build=build, flops=0.0, bytes=0.0, bound="compute", compare_tol=0.0)


def _case_packed(lengths, dtype, backend):
    def build(device):
        from transformers import DataCollatorWithFlattening
        ours, ref = _models(device, dtype, True)
        g = torch.Generator().manual_seed(2)
        seqs = [torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist()
                for n in lengths]
        packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": x} for x in seqs])
        packed = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in packed.items()}
        ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        padded = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  "labels": ids.masked_fill(mask == 0, -100).to(device)}
        return Pair(_with_backend(backend, _train_step(ours, packed)), _train_step(ref, padded))
    return Case(op="hf", variant="llama-packed",
                shape={"N": len(lengths), "tokens": sum(lengths), "max": max(lengths)},
                dtype=dtype, direction="fwd+bwd", backend=backend,
                baseline="transformers sdpa, padded batch", build=build, flops=0.0,
                bytes=0.0, bound="compute", compare_tol=1e-3)


def _with_backend(backend, fn):
    from .common import fastattn_on
    return fastattn_on(backend, fn)


def cases(device_type, quick, backends):
    out = []
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    for be in backends:
        out.append(_case_train(4, 512, dtype, be))
        out.append(_case_generate(4, 512, 64, dtype, be))
        out.append(_case_packed(PACKED_LENGTHS, dtype, be))
    return out
