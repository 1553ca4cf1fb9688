"""pytest-benchmark: layer_norm and rms_norm, fastattn against F.layer_norm / F.rms_norm
(cases: cases/layer_norm.py)."""

import pytest

from .pytest_support import IMPLS, cases, run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("layer_norm", "rms_norm"), ids=lambda c: c.id)
def test_norm(benchmark, case, impl):
    run(benchmark, case, impl)
