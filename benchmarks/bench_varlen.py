"""pytest-benchmark: varlen_attention (packed training step) against the padded dense call
(cases: cases/varlen.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("varlen"), ids=lambda c: c.id)
def test_varlen(benchmark, case, impl):
    run(benchmark, case, impl)
