"""Context-parallel (ring) attention and distributed training on real process groups: 2 and 4
gloo ranks on this machine (spawned processes, localhost).

Every test runs its ranks through fastattn.distributed.run_local: a process-group timeout
makes a rank blocked on a dead or diverged peer raise, and a deadline kills any rank still
alive, so no test can hang.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from tolerances import FP32_TOL, TIGHT_FP32_TOL

import distributed_workers as workers
import fastattn.distributed as fd

# Tight fp32 bounds of the dense attention tests (tests/conftest.py)


def cfg(name, layout, causal, H=4, Hkv=4, D=16, S=32, B=2, **extra):
    return dict(name=name, layout=layout, causal=causal, B=B, H=H, Hkv=Hkv, S=S, D=D, **extra)


def check_parity(results):
    for rank, per_cfg in enumerate(results):
        for cname, tensors in per_cfg.items():
            for tname, (ours, ref, ref64) in tensors.items():
                msg = f"rank {rank}, {cname}, {tname}"
                assert ours.dtype == torch.float32 and torch.isfinite(ours).all(), msg
                torch.testing.assert_close(ours, ref, **FP32_TOL, msg=lambda m: f"{msg}: {m}")
                torch.testing.assert_close(ours.double(), ref64, **FP32_TOL,
                                           msg=lambda m: f"{msg} (fp64 ref): {m}")


TWO_RANK_CONFIGS = [
    cfg("zigzag-causal", "zigzag", True),
    cfg("zigzag-full", "zigzag", False),
    cfg("contiguous-causal", "contiguous", True),
    cfg("contiguous-full", "contiguous", False),
    cfg("zigzag-causal-gqa-d40", "zigzag", True, H=4, Hkv=2, D=40, S=36),
    cfg("contiguous-causal-mqa-d40", "contiguous", True, H=4, Hkv=1, D=40, S=18, B=1),
    cfg("zigzag-causal-window", "zigzag", True, window=(5, -1), S=40),
    cfg("contiguous-window-softcap", "contiguous", False, window=(6, 3), softcap=5.0),
]


def test_ring_attention_two_ranks_matches_full_attention():
    check_parity(fd.run_local(workers.ring_parity, 2, TWO_RANK_CONFIGS, timeout_s=120))


def test_ring_attention_four_ranks_matches_full_attention():
    configs = [cfg("zigzag-causal-gqa-d40", "zigzag", True, H=4, Hkv=2, D=40, S=48),
               cfg("contiguous-full", "contiguous", False, S=20, B=1),
               cfg("contiguous-causal-window", "contiguous", True, window=(9, -1), S=40, B=1)]
    check_parity(fd.run_local(workers.ring_parity, 4, configs, timeout_s=150))


def test_ddp_and_fsdp2_train_like_one_process():
    """A fastattn.patch-ed TransformerEncoder, 3 SGD steps, global batch split over 2 ranks:
    DDP and FSDP2 (fully_shard) losses equal the single-process losses."""
    results = fd.run_local(workers.ddp_and_fsdp, 2, 3, timeout_s=150)
    single = results[0]["single"]
    assert len(single) == 3 and single[0] != single[-1]
    for rank, r in enumerate(results):
        for kind in ("ddp", "fsdp2"):
            if r[kind] is None:
                continue
            torch.testing.assert_close(torch.tensor(r[kind]), torch.tensor(single),
                                       **TIGHT_FP32_TOL, msg=lambda m: f"rank {rank} {kind}: {m}")
    if any(r["fsdp2"] is None for r in results):
        pytest.skip("DDP checked; FSDP2 on CPU needs a newer torch (this torch's CPU streams "
                    "have no record_event)")


def test_rank_dying_raises_instead_of_hanging():
    with pytest.raises(fd.RankFailure) as info:
        fd.run_local(workers.rank_dies, 2, timeout_s=60, pg_timeout_s=10)
    failure = info.value
    assert "exit code 3" in failure.errors[1]
    # the survivor got an error from torch.distributed (peer gone or timeout), not a hang
    assert failure.results[0]["error"], failure.results
    assert failure.results[0]["seconds"] < 30


def test_stalled_rank_hits_the_process_group_timeout():
    results = fd.run_local(workers.rank_stalls, 2, 12.0, timeout_s=60, pg_timeout_s=4)
    error, seconds = results[0]["error"], results[0]["seconds"]
    assert error and seconds < 12, results[0]    # raised by the 4 s timeout, before rank 1 woke
    assert "timed out" in error.lower() or "timeout" in error.lower(), error


def test_mismatched_shape_on_one_rank_raises_on_every_rank():
    results = fd.run_local(workers.mismatched_shapes, 2, timeout_s=60, pg_timeout_s=10)
    for r in results:
        assert r["error"] and "same shapes" in r["error"]
        assert "rank 0: q (1, 2, 8, 8)" in r["error"] and "rank 1: q (1, 2, 12, 8)" in r["error"]


def test_run_local_kills_ranks_past_the_deadline():
    with pytest.raises(fd.RankFailure, match="deadline"):
        fd.run_local(workers.sleeps_forever, 2, timeout_s=8, pg_timeout_s=60)


def test_example_trains_under_torchrun(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(fd.local.free_port()), os.path.join(root, "examples", "context_parallel.py"),
           "--steps", "2", "--seq-len", "64"]
    # the ranks import the fastattn this process imported (an installed one in make
    # test-compat, whose source copy at `root` is not built), not whatever `root` holds
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fd.__path__[0])))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    # own session, so a timeout kills torchrun and the ranks it started together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun example ran past 120 s:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    losses = [float(ln.split()[-1]) for ln in stdout.splitlines() if ln.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0], stdout   # it trains
