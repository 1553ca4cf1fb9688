"""Collectives of fastattn.distributed that return only once torch.distributed has let go of
their tensors.

Why: a gloo collective runs on one of the process group's worker threads, and the work item
(which holds the collective's input and output tensors) is released by that thread a moment
after the caller's wait() returns. If the caller has dropped those tensors by then, the worker
frees their Python objects and needs the GIL for it. On torch 2.6, destroy_process_group()
drops the ProcessGroupGloo from Python, so its destructor joins the worker threads while
holding the GIL: a worker still releasing a finished collective waits for the GIL, the
destructor waits for the worker, and the rank hangs (seen in about 1 of 3 runs of the
context-parallel tests: one rank stuck in ~ProcessGroupGloo -> thread::join, its worker in
~TensorImpl -> gil_scoped_acquire). Newer torch shuts the group down with the GIL released.

Waiting here (sleeping, so without the GIL) until the tensors' reference counts are back to
what they were before the call means the caller, under the GIL, always drops the last
reference, and no worker thread needs the GIL afterwards.
"""

import time

import torch.distributed as dist

_RELEASE_TIMEOUT_S = 2.0


def _use_counts(tensors):
    return [t._use_count() for t in tensors]


def wait_until_released(tensors, before, timeout_s=_RELEASE_TIMEOUT_S):
    """Sleep until no tensor has more references than in `before` (its counts before the
    collective). Bounded: a worker still running an unfinished collective (its wait raised)
    keeps its references; after timeout_s this returns and the caller goes on."""
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > n for t, n in zip(tensors, before)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def all_gather(outputs, tensor, group=None):
    """dist.all_gather(outputs, tensor, group) that returns (or raises) only after the process
    group's worker has released `outputs` and `tensor`."""
    tensors = [tensor, *outputs]
    if not hasattr(tensor, "_use_count"):      # no reference count to watch: plain call
        dist.all_gather(outputs, tensor, group=group)
        return
    before = _use_counts(tensors)
    try:
        dist.all_gather(outputs, tensor, group=group)
    except BaseException as exc:
        # The traceback's frames hold the work object and through it the tensors: drop them
        # (here, under the GIL) before waiting for the worker's references to go.
        exc.__traceback__ = None
        wait_until_released(tensors, before)
        raise exc
    wait_until_released(tensors, before)
