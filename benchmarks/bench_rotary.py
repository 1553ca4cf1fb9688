"""pytest-benchmark: rotary, fastattn against its PyTorch counterpart
(cases: cases/rotary.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("rotary"), ids=lambda c: c.id)
def test_rotary(benchmark, case, impl):
    run(benchmark, case, impl)
