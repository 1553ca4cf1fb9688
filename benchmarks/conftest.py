"""pytest setup for the microbenchmarks in this directory.

    .venv/bin/python -m pytest benchmarks/ --benchmark-enable -p no:cacheprovider

The files are named bench_*.py (they are benchmarks, not tests), so collect them here.
FASTATTN_BENCH_THREADS (default 2) sets torch's thread count; FASTATTN_BENCH_FULL=1 runs the
full sweep instead of the main shapes.
"""

import os

import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("FASTATTN_BENCH_THREADS", "2")))
