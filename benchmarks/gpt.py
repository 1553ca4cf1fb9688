"""A small GPT-style decoder built from stock PyTorch modules, for the end-to-end benchmark.

Token embeddings + fixed sinusoidal positions (nn.MultiheadAttention does its projections
inside the module, so rotary positions would need a custom attention; sinusoidal keeps the
PyTorch model stock), pre-norm blocks of causal nn.MultiheadAttention and a GELU MLP, a final
norm and an LM head. fastattn.patch() swaps its nn.MultiheadAttention / nn.LayerNorm /
nn.RMSNorm for fastattn modules with the same weights.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class GPTConfig:
    vocab: int = 4096
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    seq: int = 256
    mlp_ratio: int = 4
    norm: str = "layer"          # "layer" (nn.LayerNorm) or "rms" (nn.RMSNorm)


def sinusoidal_positions(seq, d):
    pos = torch.arange(seq, dtype=torch.float32).unsqueeze(1)                 # (S, 1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(seq, d)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table                                                               # (S, d)


def _norm(cfg):
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "layer" else nn.RMSNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.ln1 = _norm(cfg)
        self.attn = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
        self.ln2 = _norm(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * d, d))

    def forward(self, x, mask):                                               # x (B, S, d)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.register_buffer("pos", sinusoidal_positions(cfg.seq, cfg.d_model), persistent=False)
        # nn.MultiheadAttention convention: True = masked out (the future).
        mask = torch.ones(cfg.seq, cfg.seq, dtype=torch.bool).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = _norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, idx, targets=None):                                     # idx (B, S)
        s = idx.shape[1]
        x = self.tok(idx) + self.pos[:s]
        mask = self.causal_mask[:s, :s]
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.ln_f(x))                                      # (B, S, vocab)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
