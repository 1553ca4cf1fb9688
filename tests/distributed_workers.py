"""Per-rank bodies of tests/test_distributed.py (module-level: spawned ranks import them)."""

import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import fastattn
import fastattn.distributed as fd
from fastattn import reference


def _full_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, s, d = cfg["B"], cfg["H"], cfg["Hkv"], cfg["S"], cfg["D"]
    q = torch.randn(b, h, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    dout = torch.randn(b, h, s, d, generator=g)
    return q, k, v, dout


def ring_parity(rank, world_size, configs):
    """For each config: this rank's shard of out, dq, dk, dv from context_parallel_attention
    and from single-process attention on the full sequence (fastattn and the fp64 reference)."""
    results = {}
    for cfg in configs:
        layout, causal = cfg["layout"], cfg["causal"]
        window, softcap = cfg.get("window"), cfg.get("softcap", 0.0)
        q, k, v, dout = _full_inputs(cfg)
        kw = dict(is_causal=causal, window=window, softcap=softcap)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fastattn.scaled_dot_product_attention(*full, enable_gqa=True, **kw)
        out.backward(dout)
        f64 = [t.double().requires_grad_() for t in (q, k, v)]
        wl, wr = (-1, -1) if window is None else window
        out64 = reference.attention(*f64, causal=causal, window_left=wl, window_right=wr,
                                    softcap=softcap)
        out64.backward(dout.double())

        def shard(t):
            return fd.shard_sequence(t.detach(), 2, rank, world_size, layout)

        local = [shard(t).requires_grad_() for t in (q, k, v)]
        mine = fd.context_parallel_attention(*local, layout=layout, **kw)
        mine.backward(shard(dout))
        results[cfg["name"]] = {
            name: (ours.detach(), shard(ref), shard(ref64))
            for name, ours, ref, ref64 in (
                ("out", mine, out, out64),
                ("dq", local[0].grad, full[0].grad, f64[0].grad),
                ("dk", local[1].grad, full[1].grad, f64[1].grad),
                ("dv", local[2].grad, full[2].grad, f64[2].grad))}
        # the gathered output is the full output (shard/unshard/gather helpers)
        # ... and returns only once the process group's worker has let go of its input (else
        # torch 2.6's destroy_process_group can deadlock: fastattn/distributed/collectives.py)
        src = mine.detach()
        refs = src._use_count()
        gathered = fd.gather_sequence(src, 2, layout=layout)
        assert src._use_count() == refs, "gather_sequence returned while gloo held its input"
        results[cfg["name"]]["gathered"] = (gathered, out.detach(), out64.detach())
    return results


# ------------------------------------------------------------------ DDP / FSDP2

def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                          nn.Linear(32, 8))
    return fastattn.patch(model)


def batches(steps, world_size, per_rank=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(world_size * per_rank, 12, 32, generator=g),
             torch.randint(0, 8, (world_size * per_rank, 12), generator=g)) for _ in range(steps)]


def train_losses(model, steps, world_size, rank, per_rank=2):
    """Global-batch losses of `steps` SGD steps; each rank trains on its slice of the batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x, y in batches(steps, world_size, per_rank):
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        logits = model(x[sl])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 8), y[sl].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= world_size
        losses.append(global_loss.item())
    return losses


def single_process_losses(steps, world_size):
    """The reference: one process, the whole global batch (mean loss = mean of rank losses
    because every rank's slice has the same size)."""
    model = tiny_transformer()
    patched = [n for n, _, new in model.fastattn_patched if new == "MultiHeadAttention"]
    assert patched, "fastattn.patch replaced no attention module"
    return train_losses(model, steps, 1, 0, per_rank=2 * world_size)


def ddp_and_fsdp(rank, world_size, steps):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {"ddp": train_losses(DDP(tiny_transformer()), steps, world_size, rank)}
    out["single"] = single_process_losses(steps, world_size) if rank == 0 else None
    if not hasattr(torch.cpu.Stream(), "record_event"):
        out["fsdp2"] = None       # FSDP2 on CPU records events on CPU streams (not in torch 2.6)
        return out
    model = tiny_transformer()
    for layer in model[0].layers:
        fully_shard(layer)
    fully_shard(model)
    out["fsdp2"] = train_losses(model, steps, world_size, rank)
    return out


# ------------------------------------------------------------------ failures

def rank_dies(rank, world_size):
    """Rank 1 exits abruptly before attention; rank 0 must get an error, not hang."""
    cfg = dict(B=1, H=2, Hkv=2, S=16, D=8)
    q, k, v, _ = _full_inputs(cfg)
    if rank == 1:
        os._exit(3)
    local = [fd.shard_sequence(t, 2, rank, world_size, "zigzag") for t in (q, k, v)]
    t0 = time.monotonic()
    try:
        fd.context_parallel_attention(*local, is_causal=True)
    except Exception as exc:  # noqa: BLE001 - what the test inspects
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - t0}
    return {"error": None}


def mismatched_shapes(rank, world_size):
    cfg = dict(B=1, H=2, Hkv=2, S=16 if rank == 0 else 24, D=8)
    q, k, v, _ = _full_inputs(cfg)
    local = [fd.shard_sequence(t, 2, rank, world_size, "zigzag") for t in (q, k, v)]
    try:
        fd.context_parallel_attention(*local, is_causal=True)
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def ring_timing(rank, world_size, cfg, steps):
    """Per-rank fwd+bwd seconds (median of `steps`) with and without communication."""
    q, k, v, dout = _full_inputs(cfg)
    local = [fd.shard_sequence(t, 2, rank, world_size, cfg["layout"]) for t in (q, k, v)]
    d_local = fd.shard_sequence(dout, 2, rank, world_size, cfg["layout"])
    times = {}
    for mode in ("compute_only", "ring", "compute_only", "ring"):
        samples = []
        for _ in range(steps):
            leaves = [t.clone().requires_grad_() for t in local]
            dist.barrier()
            t0 = time.perf_counter()
            out = fd.context_parallel_attention(*leaves, is_causal=cfg["causal"],
                                                layout=cfg["layout"],
                                                _compute_only=mode == "compute_only")
            out.backward(d_local)
            samples.append(time.perf_counter() - t0)
        times.setdefault(mode, []).extend(samples)
    return {m: sorted(s)[len(s) // 2] for m, s in times.items()}


def sleeps_forever(rank, world_size):
    time.sleep(3600)


def rank_stalls(rank, world_size, stall_s):
    """Rank 1 stays alive but never joins the attention call; rank 0 must time out with an
    error (the process group's timeout), not wait forever."""
    if rank == 1:
        time.sleep(stall_s)
        return {"error": None}
    return rank_dies(rank, world_size)
