"""Which part of which kernel call each (query chunk, key chunk) pair of the ring needs.

Visibility is by global position: query at global position p sees key at position p' iff
(causal => p' <= p) and (window_left >= 0 => p' >= p - window_left) and
(window_right >= 0 => p' <= p + window_right). For one pair of chunks this is a band
lo <= j - i <= hi in local indices (i into the query chunk, j into the key chunk), which one
call of the attention kernel computes with top-left alignment after trimming rows that see
no key (i < -hi, or past the band's end) and keys no row sees (j < lo, or past it): every
row of a call sees at least one key.
"""

import dataclasses
from typing import Optional

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """One attention call: query rows [q_start, q_end) against keys [k_start, k_end) (local
    indices into this rank's q and the key shard held), with these kernel arguments."""
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    is_causal: bool
    window: tuple  # (left, right), -1 = unbounded (top-left alignment)

    @property
    def full(self):
        return not self.is_causal and self.window == (-1, -1)


def band(q_global, k_global, causal, window):
    """(lo, hi): key j of a chunk starting at k_global is visible to query i of a chunk starting
    at q_global iff lo <= j - i <= hi (+-inf when unbounded)."""
    wl, wr = window
    hi_rel = INF
    if causal:
        hi_rel = 0
    if wr >= 0:
        hi_rel = min(hi_rel, wr)
    lo_rel = -wl if wl >= 0 else -INF
    d = q_global - k_global
    return d + lo_rel, d + hi_rel


def block_call(q_global, q_local, q_len, k_global, k_local, k_len, causal,
               window) -> Optional[BlockCall]:
    """The kernel call for one (query chunk, key chunk) pair, or None when no query sees any
    key of the chunk."""
    if q_len == 0 or k_len == 0:
        return None
    lo, hi = band(q_global, k_global, causal, window)
    if hi < -(q_len - 1) or lo > k_len - 1 or lo > hi:
        return None
    if hi >= k_len - 1 and lo <= -(q_len - 1):
        return BlockCall(q_local, q_local + q_len, k_local, k_local + k_len, False, (-1, -1))
    q_off = int(max(0, -hi))   # rows i < -hi see no key of the chunk
    k_off = int(max(0, lo))    # keys j < lo are seen by no row
    lo2, hi2 = lo + q_off - k_off, hi + q_off - k_off   # now lo2 <= 0 <= hi2
    nq, nk = q_len - q_off, k_len - k_off
    if lo2 != -INF:     # trailing rows whose band starts past the last key see none
        nq = min(nq, int(nk - lo2))
    if hi2 != INF:      # trailing keys past the last row's band are seen by none
        nk = min(nk, int(nq + hi2))
    causal2 = hi2 == 0
    window2 = (-1 if lo2 == -INF else int(-lo2), -1 if (hi2 == INF or causal2) else int(hi2))
    return BlockCall(q_local + q_off, q_local + q_off + nq, k_local + k_off,
                     k_local + k_off + nk, causal2, window2)


def step_calls(q_chunks, k_chunks, causal, window):
    """The calls of one ring step: q_chunks / k_chunks as sharding.local_chunks returns them.
    When every pair is fully visible they fold into one call (per query chunk, or in all)."""
    per_q = []
    for qg, ql, qn in q_chunks:
        calls = [block_call(qg, ql, qn, kg, kl, kn, causal, window) for kg, kl, kn in k_chunks]
        calls = [c for c in calls if c is not None]
        contiguous_keys = all(a[1] + a[2] == b[1] for a, b in zip(k_chunks, k_chunks[1:]))
        if (len(calls) == len(k_chunks) > 1 and all(c.full for c in calls)
                and contiguous_keys):
            calls = [BlockCall(ql, ql + qn, k_chunks[0][1], k_chunks[-1][1] + k_chunks[-1][2],
                               False, (-1, -1))]
        per_q.append(calls)
    flat = [c for calls in per_q for c in calls]
    if (len(per_q) > 1 and all(len(c) == 1 and c[0].full for c in per_q)
            and len({(c.k_start, c.k_end) for c in flat}) == 1):
        return [BlockCall(flat[0].q_start, flat[-1].q_end, flat[0].k_start, flat[0].k_end,
                          False, (-1, -1))]
    return flat


def visible_pairs(call: BlockCall):
    """Number of (query, key) pairs the call computes that are visible: its useful work."""
    nq, nk = call.q_end - call.q_start, call.k_end - call.k_start
    wl, wr = call.window
    hi = 0 if call.is_causal else (wr if wr >= 0 else nk)
    lo = -wl if wl >= 0 else -nq
    total = 0
    for i in range(nq):
        first, last = max(0, i + lo), min(nk - 1, i + hi)
        total += max(0, last - first + 1)
    return total
