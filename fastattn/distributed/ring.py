"""Ring (context-parallel) attention over torch.distributed point-to-point ops.

Every rank holds one shard of q, k and v along the sequence. In W steps each rank's K/V shard
travels once around the ring (rank r sends to r+1 and receives from r-1); at step t rank r
attends its queries to the K/V of rank (r - t) mod W and merges the partial result into its
running (out, lse) with merge_attention_states. The transfer of the next K/V shard is posted
(async isend/irecv) before the current block is computed and waited for after it.

The backward sends K/V around the ring again, together with the dK/dV accumulated for the K/V
shard being carried: at step t a rank adds its contribution to the dK/dV it received for the
shard it holds and passes the sum on; after W steps every shard's complete dK/dV is one hop
away from its owner and a last exchange delivers it. Each block's gradient comes from
attention_backward_with_lse with the merged (out, lse) of the forward, i.e. the global softmax.
"""

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from ..attention_lse import (attention_backward_with_lse, attention_forward_with_lse,
                             merge_attention_states)
from . import collectives, plan, sharding

_KV_TAG, _GRAD_TAG = 0, 1
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@dataclasses.dataclass(frozen=True)
class RingSpec:
    group: Any
    rank: int
    world_size: int
    layout: str
    causal: bool
    scale: float
    window: tuple
    softcap: float
    compute_only: bool = False   # benchmarks: same calls, no communication (own K/V each step)

    def q_chunks(self, local_len):
        return sharding.local_chunks(local_len, self.rank, self.world_size, self.layout)

    def calls(self, step, local_len):
        """The kernel calls of ring step `step` (K/V of rank (rank - step) mod W)."""
        src = (self.rank - step) % self.world_size
        k_chunks = sharding.local_chunks(local_len, src, self.world_size, self.layout)
        return plan.step_calls(self.q_chunks(local_len), k_chunks, self.causal, self.window)


class _Ring:
    """Posts one step's sends to the next rank and receives from the previous rank."""

    def __init__(self, spec: RingSpec):
        self.spec = spec
        w, r, g = spec.world_size, spec.rank, spec.group
        self.next = dist.get_global_rank(g, (r + 1) % w) if g is not None else (r + 1) % w
        self.prev = dist.get_global_rank(g, (r - 1) % w) if g is not None else (r - 1) % w
        self.timeout = _gloo_timeout(g)

    def exchange(self, pairs):
        """pairs: [(tensor to send, buffer to receive into, tag)], in one fixed order on every
        rank. Returns the requests to wait on."""
        if self.spec.compute_only or not pairs:
            return []
        # Every receive is posted before any send, so no backend whose send waits for the
        # matching receive can make a cycle of ranks each waiting on the next. (The torch 2.6
        # hangs once put down to send order were a teardown deadlock: see collectives.py.)
        recvs = [dist.P2POp(dist.irecv, recv, self.prev, self.spec.group, tag)
                 for _, recv, tag in pairs]
        sends = [dist.P2POp(dist.isend, send, self.next, self.spec.group, tag)
                 for send, _, tag in pairs]
        return dist.batch_isend_irecv(recvs + sends)

    def wait(self, reqs):
        for req in reqs:
            if self.timeout is None:
                req.wait()
            else:
                req.wait(self.timeout)


def _gloo_timeout(group):
    """The gloo process group's timeout, passed to each point-to-point wait: torch 2.6's gloo
    does not apply it to a plain wait() on isend/irecv requests, which then block forever
    when a peer never posts its side. None for other backends (they apply their own)."""
    pg = group if group is not None else dist.group.WORLD
    try:
        return pg._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _block_args(spec, call):
    return dict(scale=spec.scale, is_causal=call.is_causal, causal_alignment="top_left",
                window=call.window, softcap=spec.softcap)


def ring_forward(q, k, v, spec: RingSpec):
    """out (B, H, S_local, D) in q's dtype, lse (B, H, S_local) fp32: this rank's queries
    against the keys of all ranks."""
    b, h, s, _ = q.shape
    ring = _Ring(spec)
    acc = torch.promote_types(q.dtype, torch.float32)   # fp32 accumulators (fp64 stays)
    out = torch.zeros(b, h, s, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32, device=q.device)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    for step in range(spec.world_size):
        reqs = []
        if step < spec.world_size - 1:
            k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
            reqs = ring.exchange([(k_cur, k_next, _KV_TAG), (v_cur, v_next, _KV_TAG)])
        for call in spec.calls(step, s):
            qs, ks = slice(call.q_start, call.q_end), slice(call.k_start, call.k_end)
            o_blk, l_blk = attention_forward_with_lse(q[:, :, qs], k_cur[:, :, ks],
                                                      v_cur[:, :, ks], **_block_args(spec, call))
            o_new, l_new = merge_attention_states(out[:, :, qs], lse[:, :, qs],
                                                  o_blk.to(acc), l_blk)
            out[:, :, qs] = o_new
            lse[:, :, qs] = l_new
        ring.wait(reqs)
        if step < spec.world_size - 1 and not spec.compute_only:
            k_cur, v_cur = k_next, v_next
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, spec: RingSpec):
    """(dq, dk, dv) of this rank's shards given the merged (out, lse) of ring_forward."""
    s = q.shape[2]
    ring = _Ring(spec)
    dout = dout.contiguous()
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    dk_carried = dv_carried = None  # fp32 dK/dV so far of the K/V shard held at the last step
    for step in range(spec.world_size):
        pairs = []
        if step > 0:  # pass on the dK/dV of the shard held last step; receive the new one's
            dk_in, dv_in = torch.empty_like(dk_carried), torch.empty_like(dv_carried)
            pairs += [(dk_carried, dk_in, _GRAD_TAG), (dv_carried, dv_in, _GRAD_TAG)]
        if step < spec.world_size - 1:
            k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
            pairs += [(k_cur, k_next, _KV_TAG), (v_cur, v_next, _KV_TAG)]
        reqs = ring.exchange(pairs)
        dk_own = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv_own = torch.zeros(v.shape, dtype=acc, device=v.device)
        for call in spec.calls(step, s):
            qs, ks = slice(call.q_start, call.q_end), slice(call.k_start, call.k_end)
            dq_b, dk_b, dv_b = attention_backward_with_lse(
                dout[:, :, qs], q[:, :, qs], k_cur[:, :, ks], v_cur[:, :, ks], out[:, :, qs],
                lse[:, :, qs], **_block_args(spec, call))
            dq[:, :, qs] += dq_b
            dk_own[:, :, ks] += dk_b
            dv_own[:, :, ks] += dv_b
        ring.wait(reqs)
        if step > 0 and not spec.compute_only:
            dk_own += dk_in
            dv_own += dv_in
        dk_carried, dv_carried = dk_own, dv_own
        if step < spec.world_size - 1 and not spec.compute_only:
            k_cur, v_cur = k_next, v_next
    if spec.world_size > 1:  # the carried dK/dV belong to the next rank; ours come from prev
        dk_fin, dv_fin = torch.empty_like(dk_carried), torch.empty_like(dv_carried)
        reqs = ring.exchange([(dk_carried, dk_fin, _GRAD_TAG), (dv_carried, dv_fin, _GRAD_TAG)])
        ring.wait(reqs)
        if not spec.compute_only:
            dk_carried, dv_carried = dk_fin, dv_fin
    return dq.to(q.dtype), dk_carried.to(k.dtype), dv_carried.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):
        out, lse = ring_forward(q.detach(), k.detach(), v.detach(), spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


def _check_same_everywhere(q, k, v, spec, group):
    """All ranks must call with the same shapes and options, or the ring would hang or compute
    garbage: compare them with one all_gather and raise the same clear error on every rank."""
    desc = [*q.shape, *k.shape, *v.shape, _DTYPE_CODES.get(q.dtype, 9), int(spec.causal),
            sharding.LAYOUTS.index(spec.layout), *spec.window, float(spec.scale),
            float(spec.softcap)]
    mine = torch.tensor(desc, dtype=torch.float64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(spec.world_size)]
    collectives.all_gather(everyone, mine, group=group)
    rows = [t.tolist() for t in everyone]
    if any(r != rows[0] for r in rows):
        names = ("q", "k", "v")

        def describe(r):
            shapes = ", ".join(f"{n} {tuple(int(x) for x in r[4 * i:4 * i + 4])}"
                               for i, n in enumerate(names))
            dtype = {c: str(d) for d, c in _DTYPE_CODES.items()}.get(int(r[12]), "other")
            return (f"{shapes}, dtype {dtype}, is_causal={bool(r[13])}, "
                    f"layout={sharding.LAYOUTS[int(r[14])]!r}, window=({int(r[15])}, "
                    f"{int(r[16])}), scale={r[17]:.6g}, softcap={r[18]:g}")

        lines = "; ".join(f"rank {i}: {describe(r)}" for i, r in enumerate(rows))
        raise ValueError("context_parallel_attention: every rank of the group must pass q/k/v "
                         f"shards of the same shapes and dtype and the same options; got {lines}")


def context_parallel_attention(q, k, v, *, group=None, is_causal=False, scale=None,
                               layout="zigzag", window=None, softcap=0.0, return_lse=False,
                               check_inputs=True, _compute_only=False):
    """Attention over a sequence split across the ranks of `group` (context parallelism).

    q (B, H, S_local, D), k, v (B, Hkv, S_local, D), H % Hkv == 0: this rank's shard of the
    sequence in the layout shard_sequence(x, 2, rank, world_size, layout) produces ("zigzag":
    chunks r and 2W-1-r of 2W, load-balanced under causal masking; "contiguous": piece r of W).
    Returns this rank's shard of the full self-attention output (and its fp32 log-sum-exp with
    return_lse=True), differentiable w.r.t. q, k and v. is_causal, window ((left, right) in
    keys, by global position) and softcap mean what they mean in
    fastattn.scaled_dot_product_attention (Sq == Sk, so the causal alignment does not matter).

    Every rank of the group must call it with the same shapes and options; with
    check_inputs=True (default) one small all_gather verifies that and every rank raises the
    same ValueError otherwise. Communication: torch.distributed isend/irecv (gloo or nccl),
    overlapped with the attention kernels of the previous block.
    """
    from .._checks import window_pair
    from ..attention_lse import _validate_qkv
    sharding.check_layout(layout)
    _validate_qkv(q, k, v, "top_left", softcap)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"context_parallel_attention is self-attention over one sharded "
                         f"sequence: q and k/v shards must have the same length, got "
                         f"{q.shape[2]} and {k.shape[2]}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed "
                           "process group (torch.distributed.init_process_group)")
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"layout='zigzag': the local sequence length must be even (two "
                         f"chunks), got {q.shape[2]}")
    spec = RingSpec(group=group, rank=rank, world_size=world_size, layout=layout,
                    causal=bool(is_causal),
                    scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                    window=window_pair(window), softcap=float(softcap),
                    compute_only=bool(_compute_only))
    if check_inputs and world_size > 1:
        _check_same_everywhere(q, k, v, spec, group)
    out, lse = _RingAttention.apply(q, k, v, spec)
    return (out, lse) if return_lse else out


def rank_work(seq_len, world_size, layout, *, is_causal=False, window=None):
    """Visible (query, key) pairs each rank computes over all ring steps: its attention FLOPs
    are 4 * D * pairs forward. A list indexed by rank (deterministic; for load-balance checks)."""
    from .._checks import window_pair
    window = window_pair(window)
    local_len = seq_len // world_size
    work = []
    for rank in range(world_size):
        spec = RingSpec(None, rank, world_size, layout, bool(is_causal), 1.0, window, 0.0)
        work.append(sum(plan.visible_pairs(c) for step in range(world_size)
                        for c in spec.calls(step, local_len)))
    return work
