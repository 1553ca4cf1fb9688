"""pytest-benchmark: mha, fastattn against its PyTorch counterpart
(cases: cases/mha.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("mha"), ids=lambda c: c.id)
def test_mha(benchmark, case, impl):
    run(benchmark, case, impl)
