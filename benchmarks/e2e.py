"""End-to-end benchmark: the same small GPT (benchmarks/gpt.py) as stock PyTorch and after
fastattn.patch() of a deep copy (same weights), timed side by side: training-step tokens/s
(forward + backward + AdamW step) and prefill tokens/s (forward under no_grad).

Before timing, both models train on the same batches for LOSS_STEPS steps and their losses
must agree within LOSS_RTOL.
"""

import copy

import torch

from . import timing
from .gpt import GPT, GPTConfig

LOSS_STEPS = 3
# fp32 throughout; the two models differ only in summation order inside attention and the
# norms. Measured on the full config: the stock model against itself with SDPA's math kernel
# instead of its flash kernel (a pure reordering) gives losses within 1.2e-7 relative over 4
# steps, while one AdamW step moves the loss by 1e-3..3e-2 relative (8.468, 8.477, 8.453,
# 8.226). 1e-4 is ~1000x the reordering noise and 10x below one step's change, so a wrong
# kernel (mask, scale, residual, a stale weight after patch) cannot hide under it.
LOSS_RTOL = 1e-4


def config(quick):
    # 4 layers, d=256, 4 heads, seq 256, batch 4: ~1 s per training step on 2 CPU cores.
    return (GPTConfig(layers=2, seq=128) if quick else GPTConfig()), (2 if quick else 4)


def make_models(cfg, device, patch=None):
    """(fastattn model, PyTorch model) with identical weights."""
    torch.manual_seed(0)
    ref = GPT(cfg).to(device)
    if patch is None:
        import fastattn
        patch = fastattn.patch
    ours = patch(copy.deepcopy(ref))
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    if ref_sd.keys() != ours_sd.keys() or any(not torch.equal(ref_sd[k], ours_sd[k])
                                              for k in ref_sd):
        raise RuntimeError("fastattn.patch changed the model's state dict (names or values)")
    if {id(p) for p in ours.parameters()} & {id(p) for p in ref.parameters()}:
        raise RuntimeError("the two models share parameters; the loss check would be vacuous")
    return ours, ref


def _batches(cfg, batch, n, device):
    """Learnable sequences (each token determines the next: t -> 5t + 3 mod vocab) from
    random starts, so the loss visibly falls step by step and the agreement check means
    something; uniform random tokens would leave the loss flat at log(vocab)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        idx = torch.empty(batch, cfg.seq + 1, dtype=torch.long)
        idx[:, 0] = torch.randint(0, cfg.vocab, (batch,), generator=g)
        for t in range(cfg.seq):
            idx[:, t + 1] = (5 * idx[:, t] + 3) % cfg.vocab
        idx = idx.to(device)
        yield idx[:, :-1], idx[:, 1:]


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    return loss.detach()


def _record(cfg, batch, device_type, backend, variant, direction):
    shape = {"layers": cfg.layers, "d": cfg.d_model, "heads": cfg.heads, "B": batch,
             "S": cfg.seq, "vocab": cfg.vocab, "norm": cfg.norm}
    return {"op": "e2e", "case": f"e2e/gpt/{variant}/{device_type}/{backend}", "variant": variant,
            "shape": shape, "shape_str": ",".join(f"{k}={v}" for k, v in shape.items()),
            "dtype": "fp32", "direction": direction, "backend": backend,
            "baseline": "same GPT on nn.MultiheadAttention + nn.LayerNorm", "device": device_type,
            "bound": "e2e", "status": "ok", "error": None}


def run(device_type="cpu", backend="cpu", quick=False, rounds=5, patch=None, model=None):
    """[train-step record, prefill record]; on failure both carry status and error.
    model=(GPTConfig, batch) overrides the size (tests use a tiny one); patch overrides
    fastattn.patch (tests break it on purpose)."""
    import fastattn
    cfg, batch = model or config(quick)
    device = torch.device(device_type)
    recs = [_record(cfg, batch, device_type, backend, "train-step", "fwd+bwd+adamw"),
            _record(cfg, batch, device_type, backend, "prefill", "fwd")]
    try:
        ours, ref = make_models(cfg, device, patch)
        with fastattn.use_backend(backend), fastattn.record_dispatch() as calls:
            ours(torch.zeros(1, 8, dtype=torch.long, device=device))
    except Exception as exc:  # fastattn modules missing or broken: say so, keep going
        for r in recs:
            r.update(status="unavailable", error=f"{type(exc).__name__}: {exc}"[:300])
        return recs
    used = sorted({f"{op}->{be}" for op, be in calls})
    if not any(op == "attention" and be == backend for op, be in calls):
        for r in recs:
            r.update(status="unavailable", error=f"patched model ran no fastattn attention on "
                                                 f"{backend!r} (dispatches: {used or 'none'})")
        return recs

    def on_backend(fn):
        def call():
            with fastattn.use_backend(backend):
                return fn()
        return call

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    data = list(_batches(cfg, batch, LOSS_STEPS + 1, device))
    losses_ours, losses_ref = [], []
    for x, y in data[:LOSS_STEPS]:
        losses_ref.append(_train_step(ref, opt_ref, x, y).item())
        losses_ours.append(on_backend(lambda: _train_step(ours, opt_ours, x, y))().item())
    rel = max(abs(a - b) / abs(b) if b else abs(a - b)
              for a, b in zip(losses_ours, losses_ref))
    train = recs[0]
    train.update(losses_fastattn=losses_ours, losses_torch=losses_ref, loss_max_rel_diff=rel,
                 loss_rtol=LOSS_RTOL, dispatches=used)
    if not rel <= LOSS_RTOL:
        train.update(status="mismatch",
                     error=f"losses differ by {rel:.2e} relative (> {LOSS_RTOL:g}) over the "
                           f"first {LOSS_STEPS} steps")
    x, y = data[-1]
    tokens = batch * cfg.seq
    timed = {"train-step": (on_backend(lambda: _train_step(ours, opt_ours, x, y)),
                            lambda: _train_step(ref, opt_ref, x, y)),
             "prefill": (on_backend(torch.no_grad()(lambda: ours(x))),
                         torch.no_grad()(lambda: ref(x)))}
    for r in recs:
        fa, pt = timed[r["variant"]]
        r.update(timing.time_pair(fa, pt, device_type, rounds, min_round_ms=0.0, warmup=1))
        r["fastattn_tokens_per_s"] = tokens / r["fastattn_ms"] * 1e3
        r["torch_tokens_per_s"] = tokens / r["torch_ms"] * 1e3
    return recs


def table(records):
    lines = ["== e2e: GPT " + (records[0]["shape_str"] if records else ""),
             f"{'variant':11} {'fastattn tok/s':>14} {'torch tok/s':>12} {'speedup':>8}  notes "
             f"(speedup: median of per-round ratios, as in the other tables)"]
    for r in records:
        if r["status"] == "unavailable":
            lines.append(f"{r['variant']:11} unavailable: {r['error']}")
            continue
        note = ""
        if "losses_fastattn" in r:
            note = (f"losses fastattn {', '.join(f'{v:.6f}' for v in r['losses_fastattn'])} "
                    f"vs torch {', '.join(f'{v:.6f}' for v in r['losses_torch'])} "
                    f"(max rel diff {r['loss_max_rel_diff']:.1e}, tol {r['loss_rtol']:g})")
        if r["status"] != "ok":
            note += f"  <-- {r['status']}: {r['error']}"
        lines.append(f"{r['variant']:11} {r['fastattn_tokens_per_s']:14.0f} "
                     f"{r['torch_tokens_per_s']:12.0f} {r['speedup']:7.2f}x  {note}")
    return "\n".join(lines)
