"""pytest-benchmark: attention, fastattn against its PyTorch counterpart
(cases: cases/attention.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("attention"), ids=lambda c: c.id)
def test_attention(benchmark, case, impl):
    run(benchmark, case, impl)
