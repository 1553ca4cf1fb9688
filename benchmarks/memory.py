"""Peak memory allocated while a callable runs (bytes above what was allocated before it).

CUDA: torch.cuda.max_memory_allocated. CPU: torch has no peak counter for its CPU allocator,
so we replay the profiler's allocation events (profile_memory=True records every CPU
allocation and free with its size and time) and take the maximum of the running sum. That
reads torch.profiler's experimental event tree; if a torch release changes it, CPU memory is
reported as unavailable (None) rather than guessed.
"""

import torch


def _cuda_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def _cpu_peak(fn):
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    events, stack = [], list(tree)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    if not events:
        return None
    current = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        current += size
        peak = max(peak, current)
    return peak


def peak_bytes(fn, device_type):
    """Peak bytes allocated by fn() beyond the starting point, or None if not measurable."""
    if device_type == "cuda":
        return _cuda_peak(fn)
    return _cpu_peak(fn)
