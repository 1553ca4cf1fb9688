"""varlen_attention cases: a packed training step (forward + backward over ragged sequences)
against the padded dense call on the same tokens.

Two baselines, each on the same sequences padded to the longest one, the loss ignoring pads
(zero output gradient there):
  - "fastattn.sdpa padded": fastattn.scaled_dot_product_attention with key_lengths (fastattn's
    own kernel on the padded batch; the comparison the issue asks for);
  - "F.sdpa padded+mask": F.scaled_dot_product_attention with a boolean causal+key-padding mask.
Both baselines return their results gathered back to the packed layout (so the runner can
compare them with varlen's); that gather is inside the baseline's timed call (a few percent of
it at the default size, which makes the measured speedup a slight overestimate).
"""

import torch
import torch.nn.functional as F

from .common import Case, Pair, fastattn_on

PADDED_FASTATTN = "fastattn.sdpa padded"
PADDED_SDPA = "F.sdpa padded+mask"


def draw_lengths(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def varlen_flops(lengths, h, d, causal, direction):
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lengths)
    fwd = 4.0 * h * pairs * d
    return fwd if direction == "fwd" else 3.5 * fwd


def _builder(lengths, h, d, dtype, causal, backend, baseline):
    def build(device):
        import fastattn
        b, s, total = len(lengths), max(lengths), sum(lengths)
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(total, h, d, generator=g).to(device, dtype)
                         for _ in range(4))
        lens = torch.tensor(lengths, device=device)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        pos = torch.arange(s, device=device)
        valid = pos[None, :] < lens[:, None]                     # (B, S)
        flat = torch.nonzero(valid.flatten()).flatten()          # padded (B*S) row -> packed

        def pad(t):                                              # (total, H, D) -> (B, H, S, D)
            p = t.new_zeros(b * s, h, d)
            p[flat] = t
            return p.view(b, s, h, d).transpose(1, 2).contiguous()

        def unpad(t):                                            # (B, H, S, D) -> (total, H, D)
            return t.transpose(1, 2).reshape(b * s, h, d).index_select(0, flat)

        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        padded = [pad(t).requires_grad_() for t in (q, k, v)]
        dout_padded = pad(dout)                                  # 0 at pads: the loss ignores them

        def ours():
            out = fastattn.varlen_attention(*leaves, cu, cu, s, s, is_causal=causal)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

        if baseline == PADDED_FASTATTN:
            def dense(qp, kp, vp):
                return fastattn.scaled_dot_product_attention(qp, kp, vp, is_causal=causal,
                                                             key_lengths=lens)
        else:
            keep = valid[:, None, None, :]                       # key padding (B, 1, 1, S)
            if causal:
                keep = keep & torch.ones(s, s, dtype=torch.bool, device=device).tril()

            def dense(qp, kp, vp):
                return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)

        def padded_step():
            out = dense(*padded)
            grads = torch.autograd.grad(out, padded, dout_padded)
            return (unpad(out.detach()), *(unpad(gr) for gr in grads))

        return Pair(fastattn_on(backend, ours), padded_step)
    return build


def _case(lengths, h, d, dtype, causal, backend, baseline, label):
    elt = torch.empty((), dtype=dtype).element_size()
    total = sum(lengths)
    return Case(op="varlen", variant=("causal " if causal else "") + label,
                shape={"B": len(lengths), "H": h, "D": d, "T": total, "S": max(lengths)},
                dtype=dtype, direction="fwd+bwd", backend=backend, baseline=baseline,
                build=_builder(lengths, h, d, dtype, causal, backend, baseline),
                flops=varlen_flops(lengths, h, d, causal, "fwd+bwd"),
                bytes=8.0 * total * h * d * elt, bound="compute")


def cases(device_type, quick, backends):
    # The case: 16 sequences, lengths drawn from 32..1024, H=8, D=64, causal.
    lengths = draw_lengths(16, 32, 1024)
    backends = [be for be in backends if be in ("cpu", "triton")]
    dtype = torch.float32 if device_type == "cpu" else torch.float16
    out = []
    for be in backends:
        out.append(_case(lengths, 8, 64, dtype, True, be, PADDED_FASTATTN, "vs-padded"))
        if not quick:
            out.append(_case(lengths, 8, 64, dtype, True, be, PADDED_SDPA, "vs-sdpa-mask"))
    return out
