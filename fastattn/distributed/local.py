"""Run a function on W local processes joined in a gloo process group, with timeouts.

For tests, benchmarks and quick experiments on one machine: every rank runs
fn(rank, world_size, *args) in a fresh (spawned) process; results come back through files in a
temporary directory. Nothing can hang: the process group has a timeout (a rank blocked on a
dead or diverged peer raises), and the parent kills every rank still alive at its deadline.
"""

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

import torch


class RankFailure(RuntimeError):
    """Some rank raised, died or timed out. .errors: {rank: traceback or reason};
    .results: {rank: result} of the ranks that finished."""

    def __init__(self, message, errors, results):
        super().__init__(message)
        self.errors, self.results = errors, results


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args, pg_timeout_s, threads):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(path + ".tmp", path + ".ok")
    except BaseException:  # noqa: BLE001 - reported to the parent, then exit non-zero
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        _end_rank(1)
    _end_rank(0)


def _end_rank(code):
    """End a rank's process (its report is written). The process group is destroyed first
    where torch shuts it down with the GIL released (ProcessGroup.shutdown: torch 2.14, not 2.6).
    torch 2.6's ProcessGroupGloo destructor joins the group's worker threads while the caller
    holds the GIL, and a worker still releasing the tensors of a collective that the rank's
    function issued and dropped needs the GIL: a deadlock (fastattn/distributed/collectives.py
    avoids it for fastattn's own collectives, but not for the function's). There the process
    ends with the group alive; its sockets close with it (os._exit, so interpreter teardown
    does not run that destructor either)."""
    import torch.distributed as dist
    try:
        if dist.is_initialized() and hasattr(dist.ProcessGroup, "shutdown"):
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_local(fn, world_size, *args, timeout_s=120.0, pg_timeout_s=30.0, threads=1):
    """[fn(0, W, *args), ..., fn(W-1, W, *args)] run on W spawned processes (gloo, localhost).

    fn must be a module-level function (it is pickled). threads: torch threads per rank
    (1 = one process per core; 0 = leave torch's default). Raises RankFailure naming every
    rank that raised (with its traceback), died or ran past timeout_s (then killed).
    """
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fastattn_dist_") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out_dir, args,
                                                  pg_timeout_s, threads), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        results, errors = {}, {}
        for r, p in enumerate(procs):
            base = os.path.join(out_dir, f"rank{r}")
            if os.path.exists(base + ".ok"):
                with open(base + ".ok", "rb") as f:
                    results[r] = pickle.load(f)
            elif os.path.exists(base + ".err"):
                with open(base + ".err") as f:
                    errors[r] = f.read()
            elif r in timed_out:
                errors[r] = f"killed after the {timeout_s:.0f} s deadline"
            else:
                errors[r] = f"died with exit code {p.exitcode} and no report"
    if errors:
        detail = "\n".join(f"--- rank {r}: {e}" for r, e in sorted(errors.items()))
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n{detail}", errors,
                          results)
    return [results[r] for r in range(world_size)]
