"""Multi-head attention module cases: fastattn.MultiHeadAttention against
nn.MultiheadAttention (batch_first, causal), with the same weights.

Two comparisons: both modules on PyTorch's fast path (need_weights=False, is_causal=True,
which PyTorch routes to SDPA), and both on the default call (need_weights=True: the weights
are returned, averaged over heads), which is what most existing model code runs. The
weights do not enter the loss (as in training code that ignores them), but both sides
compute and return them.
"""

import torch
from torch import nn

from .attention import attention_flops
from .common import Case, Pair, direct, fastattn_on, randn

BASELINES = {"fast": "nn.MultiheadAttention(need_weights=False, is_causal=True)",
             "default": "nn.MultiheadAttention(need_weights=True), both sides"}


def build_modules(e, h, device, dtype):
    """(fastattn module, PyTorch module) sharing one set of weights. Raises when fastattn has
    no MultiHeadAttention yet (the runner records the case as unavailable)."""
    import fastattn
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(e, h, batch_first=True, device=device, dtype=dtype)
    ours = fastattn.MultiHeadAttention(e, h, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _case(b, l, e, h, dtype, direction, backend, baseline):
    def build(device):
        ours, ref = build_modules(e, h, device, dtype)
        grad = direction != "fwd"
        x = randn((b, l, e), dtype, device, grad, 1)
        mask = torch.ones(l, l, dtype=torch.bool, device=device).triu(1)   # True = masked out

        def run_ours(x, *params):
            if baseline == "default":
                return ours(x, x, x, attn_mask=mask)[0]
            return ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

        def run_ref(x, *params):
            if baseline == "default":
                return ref(x, x, x, attn_mask=mask)[0]
            return ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]

        p_ours = tuple(ours.parameters()) if grad else ()
        p_ref = tuple(ref.parameters()) if grad else ()
        return Pair(fastattn_on(backend, direct(run_ours, (x, *p_ours), direction)),
                    direct(run_ref, (x, *p_ref), direction))
    proj = 8.0 * b * l * e * e                                  # q, k, v and output projections
    attn = attention_flops(b, h, l, e // h, True, direction)
    flops = (proj if direction == "fwd" else 3.0 * proj) + attn
    return Case(op="mha", variant="causal" if baseline == "fast" else "causal-weights",
                shape={"B": b, "L": l, "E": e, "H": h}, dtype=dtype, direction=direction,
                backend=backend, baseline=BASELINES[baseline], build=build, flops=flops,
                bytes=0.0, bound="compute")


def cases(device_type, quick, backends):
    out = []
    for be in backends:
        if device_type == "cpu":
            shapes = [(4, 512, 512, 8)] if quick else \
                [(4, 512, 512, 8), (16, 128, 512, 8), (1, 2048, 512, 8), (4, 256, 1024, 16)]
            dtypes = [torch.float32]
        else:
            shapes = [(8, 2048, 2048, 16)] if quick else \
                [(8, 2048, 2048, 16), (32, 512, 2048, 16), (2, 8192, 2048, 16)]
            dtypes = [torch.float16, torch.bfloat16]
        for dtype in dtypes:
            for shape in shapes:
                for direction in ("fwd", "fwd+bwd"):
                    for baseline in ("fast", "default"):
                        if quick and device_type == "cpu" and direction == "fwd" \
                                and baseline == "default":
                            continue
                        out.append(_case(*shape, dtype, direction, be, baseline))
    return out
