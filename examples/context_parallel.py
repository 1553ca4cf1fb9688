"""Train a small causal language model on one long sequence split across ranks (context
parallelism with fastattn.distributed's ring attention).

    torchrun --nproc_per_node 2 examples/context_parallel.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/context_parallel.py --steps 2  # a smoke run

Every rank holds the same weights and its zigzag shard of each sequence (tokens, positions and
next-token targets); attention runs over the whole sequence through
context_parallel_attention, everything else is per token. The loss is the mean over all
tokens of the sequence, so the ranks average their parameter gradients (an all_reduce) before
each optimizer step. On CUDA devices (--device cuda) it uses NCCL.
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fastattn
import fastattn.distributed as fd


class Block(nn.Module):
    def __init__(self, dim, heads, layout):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.norm1, self.norm2 = fastattn.RMSNorm(dim), fastattn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):                                          # x (B, S_local, dim)
        b, s, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # (B, H, S_local, D)
        a = fd.context_parallel_attention(q, k, v, is_causal=True, layout=self.layout)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, dim))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, max_len, layout):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, layout) for _ in range(layers))
        self.norm = fastattn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, positions):                          # (B, S_local) each
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))                             # (B, S_local, vocab)


def batch(step, seq_len, vocab, period, batch_size):
    """Sequences that repeat one fixed random pattern of `period` tokens (tokens recur within
    it, so the next token depends on the context, not just the current token), each starting
    at a random phase."""
    pattern = torch.randint(0, vocab, (period,), generator=torch.Generator().manual_seed(0))
    phase = torch.randint(0, period, (batch_size, 1),
                          generator=torch.Generator().manual_seed(1000 + step))
    pos = (phase + torch.arange(seq_len + 1)) % period             # (batch, seq_len + 1)
    seq = pattern[pos]
    return seq[:, :-1], seq[:, 1:]                                 # inputs, targets


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--period", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layout", choices=fd.LAYOUTS, default="zigzag")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    args = p.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)                                           # same weights on every rank
    model = TinyLM(args.vocab, args.dim, args.heads, args.layers, args.seq_len,
                   args.layout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    positions = fd.shard_positions(args.seq_len, rank, world, args.layout, device=device)
    for step in range(args.steps):
        tokens, targets = batch(step, args.seq_len, args.vocab, args.period, args.batch)
        tokens = fd.shard_sequence(tokens, 1, rank, world, args.layout).to(device)
        targets = fd.shard_sequence(targets, 1, rank, world, args.layout).to(device)
        logits = model(tokens, positions.expand(tokens.shape[0], -1))
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        # Mean over the whole sequence = mean of the equal-sized shards' means.
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        dist.all_reduce(grads)
        grads /= world
        offset = 0
        for prm in model.parameters():
            n = prm.numel()
            prm.grad.copy_(grads[offset:offset + n].view_as(prm))
            offset += n
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        if rank == 0:
            print(f"step {step} loss {global_loss.item() / world:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
