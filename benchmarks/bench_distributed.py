"""Context-parallel (ring) attention on 2 gloo ranks of this machine vs one process.

    .venv/bin/python -m benchmarks.bench_distributed            # B=1 H=8 D=64 S=8192 causal
    .venv/bin/python -m benchmarks.bench_distributed --seq-len 2048 --steps 2   # quick

One process per core (torch.set_num_threads(1) in each rank). Each figure is the median of
--steps timed fwd+bwd steps; a ring step's time is the slower rank's. Reported:
  scaling efficiency = T(1 process, 1 thread) / (2 x T(ring, 2 ranks))
  vs 2 threads       = T(1 process, 2 threads) / T(ring)
  comm hidden        = 1 - (T(ring) - T(ring compute only)) / T(comm alone), where
                       "compute only" runs the same kernel calls without communicating and
                       "comm alone" the same transfers without computing.
  zigzag balance     = max / min over ranks of the per-rank compute-only time.
  work efficiency    = CPU seconds of 1 process (1 thread) / CPU seconds of both ranks: the
                       ring's extra work (smaller kernel calls, merges, transfers); unlike the
                       wall-clock ratios it holds on a machine whose cores are busy.
Not a timed test and not part of the regression gate (it needs 2 free cores).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import fastattn
import fastattn.distributed as fd
from fastattn.distributed import ring as ring_mod


def _inputs(b, h, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g) for _ in range(4)]   # q, k, v, dout


def _single_step(q, k, v, dout, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fastattn.scaled_dot_product_attention(*leaves, is_causal=causal)
    out.backward(dout)
    return time.perf_counter() - t0, time.process_time() - c0


def single_process(shape, causal, steps, threads):
    """(wall seconds, CPU seconds) medians of one fwd+bwd step."""
    torch.set_num_threads(threads)
    q, k, v, dout = _inputs(*shape)
    _single_step(q, k, v, dout, causal)                               # warm-up
    runs = [_single_step(q, k, v, dout, causal) for _ in range(steps)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _comm_alone(spec, k, v):
    """The ring's transfers for one fwd+bwd step (forward: K/V W-1 times; backward: K/V W-1
    times and fp32 dK/dV W times), without compute."""
    ring = ring_mod._Ring(spec)
    t0 = time.perf_counter()
    for _ in range(2 * (spec.world_size - 1)):
        ring.wait(ring.exchange([(k, torch.empty_like(k), 0), (v, torch.empty_like(v), 0)]))
    dk, dv = k.float(), v.float()
    for _ in range(spec.world_size):
        ring.wait(ring.exchange([(dk, torch.empty_like(dk), 1), (dv, torch.empty_like(dv), 1)]))
    return time.perf_counter() - t0


def ring_worker(rank, world_size, shape, causal, layout, steps):
    q, k, v, dout = _inputs(*shape)
    local = [fd.shard_sequence(t, 2, rank, world_size, layout) for t in (q, k, v, dout)]
    spec = ring_mod.RingSpec(None, rank, world_size, layout, causal, shape[3] ** -0.5,
                             (-1, -1), 0.0)
    times = {"ring": [], "compute_only": [], "comm_alone": [], "compute_only_cpu": [],
             "ring_cpu": []}
    for rep in range(steps + 1):                                      # first round: warm-up
        for mode in ("compute_only", "ring", "comm_alone"):
            dist.barrier()
            if mode == "comm_alone":
                t = _comm_alone(spec, local[1], local[2])
            else:
                leaves = [t.clone().requires_grad_() for t in local[:3]]
                t0, c0 = time.perf_counter(), time.process_time()
                out = fd.context_parallel_attention(*leaves, is_causal=causal, layout=layout,
                                                    _compute_only=mode == "compute_only")
                out.backward(local[3])
                t = time.perf_counter() - t0
                if rep:   # CPU seconds (gloo's threads included): robust to a busy machine
                    times[mode + "_cpu"].append(time.process_time() - c0)
            if rep:
                times[mode].append(t)
    return {m: statistics.median(ts) for m, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layout", choices=fd.LAYOUTS, default="zigzag")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    causal = not args.no_causal
    shape = (1, args.heads, args.seq_len, args.dim)

    load_before = os.getloadavg()[0]
    ranks = fd.run_local(ring_worker, 2, shape, causal, args.layout, args.steps,
                         timeout_s=1800, pg_timeout_s=600, threads=1)
    t1, cpu1 = single_process(shape, causal, args.steps, threads=1)
    t2, _ = single_process(shape, causal, args.steps, threads=2)
    ring_cpu = sum(r["ring_cpu"] for r in ranks)
    ring_t = max(r["ring"] for r in ranks)
    compute_t = max(r["compute_only"] for r in ranks)
    comm_t = max(r["comm_alone"] for r in ranks)
    per_rank_compute = [r["compute_only"] for r in ranks]
    per_rank_cpu = [r["compute_only_cpu"] for r in ranks]
    res = {
        "shape": list(shape), "causal": causal, "layout": args.layout, "steps": args.steps,
        "single_1thread_s": t1, "single_2threads_s": t2, "ring_2ranks_s": ring_t,
        "ring_compute_only_s": compute_t, "comm_alone_s": comm_t,
        "per_rank_compute_s": per_rank_compute,
        "per_rank_ring_s": [r["ring"] for r in ranks],
        "scaling_efficiency": t1 / (2 * ring_t),
        "speedup_vs_1thread": t1 / ring_t,
        "speedup_vs_2threads": t2 / ring_t,
        "comm_exposed_s": ring_t - compute_t,
        "comm_hidden_fraction": min(1.0, max(0.0, 1 - (ring_t - compute_t) / comm_t)),
        "rank_compute_balance": max(per_rank_compute) / min(per_rank_compute),
        "per_rank_compute_cpu_s": per_rank_cpu,
        "single_1thread_cpu_s": cpu1, "ring_cpu_s_all_ranks": ring_cpu,
        "work_efficiency_cpu": cpu1 / ring_cpu,
        "rank_compute_cpu_balance": max(per_rank_cpu) / min(per_rank_cpu),
        "rank_work_pairs": fd.rank_work(args.seq_len, 2, args.layout, is_causal=causal),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
    }
    print(f"context-parallel attention, B H S D = {shape}, causal={causal}, "
          f"layout={args.layout}, medians of {args.steps} fwd+bwd steps")
    print(f"  1 process 1 thread  {t1:8.3f} s")
    print(f"  1 process 2 threads {t2:8.3f} s")
    print(f"  ring, 2 ranks x 1 thread {ring_t:8.3f} s  (compute only {compute_t:.3f} s, "
          f"comm alone {comm_t:.3f} s)")
    print(f"  scaling efficiency {res['scaling_efficiency']:.2f}  "
          f"(speedup {res['speedup_vs_1thread']:.2f}x vs 1 thread, "
          f"{res['speedup_vs_2threads']:.2f}x vs 2 threads)")
    print(f"  communication hidden {100 * res['comm_hidden_fraction']:.0f}% "
          f"(exposed {res['comm_exposed_s']:.3f} s of {comm_t:.3f} s)")
    print(f"  per-rank compute {['%.3f' % t for t in per_rank_compute]} s: max/min "
          f"{res['rank_compute_balance']:.3f}; CPU seconds {['%.3f' % t for t in per_rank_cpu]}"
          f": max/min {res['rank_compute_cpu_balance']:.3f}; visible pairs per rank "
          f"{res['rank_work_pairs']}")
    print(f"  CPU seconds: 1 process 1 thread {cpu1:.3f}, ring (both ranks) {ring_cpu:.3f}: "
          f"work efficiency {res['work_efficiency_cpu']:.2f} (1.0 = no extra work)")
    print(f"  load average (1 min) before/after: {res['load_average_1min'][0]:.1f} / "
          f"{res['load_average_1min'][1]:.1f} on {res['cpus']} CPUs (ratios assume idle cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
