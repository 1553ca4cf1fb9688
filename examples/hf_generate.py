"""Greedy generation with a Hugging Face model, with and without fastattn.

    python examples/hf_generate.py                       # a small random-weight Llama
    python examples/hf_generate.py --arch gpt2           # a small random-weight GPT-2
    python examples/hf_generate.py --model ./my-checkpoint-dir   # a local checkpoint

Builds the model twice (same weights), once with attn_implementation="sdpa" and once through
fastattn.patch(model) (attention, norms and rotary on fastattn's kernels), generates the same
left-padded batch with both, and prints tokens/s and whether the tokens are identical.
Nothing is downloaded: without --model the model comes from a config with random weights.
"""

import argparse
import copy
import time

import torch

import fastattn


def build(arch, model_dir, dtype):
    import transformers as tf
    if model_dir:
        ref = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                      dtype=dtype, local_files_only=True)
        new = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                      dtype=dtype, local_files_only=True)
        return ref.eval(), new.eval()
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=1024, n_positions=1024, n_embd=256, n_layer=4, n_head=4)
    else:
        cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                             max_position_embeddings=2048)
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    new = tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    new.load_state_dict(ref.state_dict())
    return ref.to(dtype).eval(), new.to(dtype).eval()


def generate(model, ids, mask, new_tokens):
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return out, ids.shape[0] * new_tokens / dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--model", help="a local checkpoint directory (no download)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    ref, new = build(args.arch, args.model, dtype)
    fastattn.patch(new)
    print(f"fastattn.patch replaced {len(new.fastattn_patched)} modules; attn_implementation="
          f"{new.config._attn_implementation}")

    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, args.batch):                 # left padding, as batched generation does
        pad = (b * args.prompt_len) // (2 * args.batch)
        mask[b, :pad] = 0
        ids[b, :pad] = 0

    generate(ref, ids[:, :8], mask[:, :8], 2)      # warm-up both paths
    generate(new, ids[:, :8], mask[:, :8], 2)
    out_ref, tps_ref = generate(ref, ids, mask, args.new_tokens)
    out_new, tps_new = generate(new, ids, mask, args.new_tokens)
    same = torch.equal(out_ref, out_new)
    print(f"sdpa:     {tps_ref:8.1f} tokens/s")
    print(f"fastattn: {tps_new:8.1f} tokens/s  ({tps_new / tps_ref:.2f}x)")
    print(f"identical tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
