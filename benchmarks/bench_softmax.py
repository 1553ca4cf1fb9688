"""pytest-benchmark: softmax, fastattn against its PyTorch counterpart
(cases: cases/softmax.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("softmax"), ids=lambda c: c.id)
def test_softmax(benchmark, case, impl):
    run(benchmark, case, impl)
