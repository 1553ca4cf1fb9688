"""A few training steps of a small Hugging Face Llama on padding-free packed sequences.

    python examples/hf_train_packed.py [--steps 3]

The same random-weight model is trained twice from the same start: with
attn_implementation="sdpa" on the padded batch, and through fastattn.patch(model) on the
packed batch that transformers' DataCollatorWithFlattening builds (one row, position_ids
restarting at 0, cu_seq_lens kwargs; attention runs as fastattn.varlen_attention, no padding
and no (S, S) mask). Prints both losses per step; they agree to fp32 rounding.
"""

import argparse
import copy

import torch

import fastattn


def main(argv=None):
    import transformers as tf
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sequences", type=int, default=6)
    p.add_argument("--max-len", type=int, default=96)
    args = p.parse_args(argv)

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    ref = tf.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    new = tf.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    new.load_state_dict(ref.state_dict())
    fastattn.patch(new)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt_new = torch.optim.AdamW(new.parameters(), lr=1e-3)
    collate = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        lengths = torch.randint(4, args.max_len, (args.sequences,), generator=g).tolist()
        seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        # padded batch for the reference
        ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, x in enumerate(seqs):
            ids[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), 1
        loss_ref = ref(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        # packed batch for fastattn
        packed = collate([{"input_ids": x} for x in seqs])
        loss_new = new(**packed).loss
        for opt, loss in ((opt_ref, loss_ref), (opt_new, loss_new)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        diff = abs(loss_ref.item() - loss_new.item())
        worst = max(worst, diff)
        print(f"step {step}: {sum(lengths)} tokens in {len(seqs)} sequences  "
              f"loss sdpa(padded) {loss_ref.item():.6f}  fastattn(packed) {loss_new.item():.6f}"
              f"  |diff| {diff:.2e}")
    ok = worst <= 1e-4
    print(f"losses equal within fp32 rounding: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
