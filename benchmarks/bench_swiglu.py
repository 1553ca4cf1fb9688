"""pytest-benchmark: swiglu, fastattn against its PyTorch counterpart F.silu(gate) * up
(cases: cases/swiglu.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("swiglu"), ids=lambda c: c.id)
def test_swiglu(benchmark, case, impl):
    run(benchmark, case, impl)
