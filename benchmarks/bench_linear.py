"""pytest-benchmark: linear, fastattn against its PyTorch counterpart F.linear on a decode
step's shapes, each call over enough distinct weights to leave the cache (cases: cases/linear.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("linear"), ids=lambda c: c.id)
def test_linear(benchmark, case, impl):
    run(benchmark, case, impl)
