"""tests/tolerances.py itself: each helper passes the exact case and fails a result that misses
its bound, so a parity test built on it can fail."""

import pytest
import torch

from tolerances import (ATOL_FLOOR, FP32_ATOL, FP32_RTOL, assert_max_err, assert_within_2x,
                        bound_2x, floor_for, max_err, max_relative_bound, row_sum_fp32_atol)


def _case(dtype, seed=0):
    """(ref in fp32, pt: ref rounded to dtype) of a softmax, pt's error > 0 in low precision."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 257, generator=g) * 3
    ref = torch.softmax(x, -1)
    pt = torch.softmax(x.to(dtype), -1)
    return ref, pt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2x_rule_passes_the_exact_and_the_dtype_computed_result(dtype):
    ref, pt = _case(dtype)
    assert max_err(pt, ref) > 0
    assert_within_2x(ref.to(dtype), ref, pt, name="rounded ref")
    assert_within_2x(pt, ref, pt, name="pt itself")        # 1x of pt's own error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2x_rule_fails_an_output_three_times_off(dtype):
    ref, pt = _case(dtype)
    pt_err = max_err(pt, ref)
    bad = ref.clone()
    bad[3, 7] += 3 * pt_err + floor_for(dtype)          # off by more than 2 x pt_err + floor
    with pytest.raises(AssertionError, match="grad_x: max error"):
        assert_within_2x(bad.to(dtype), ref, pt, name="grad_x")
    # the bound is 2 x pt_err + floor: twice pt's own error (plus the rounding to the dtype,
    # under half an ulp, below the floor) passes
    assert bound_2x(pt, ref, floor_for(dtype)) == pytest.approx(2 * pt_err + ATOL_FLOOR[dtype])
    twice = (ref.double() + 2 * (pt.double() - ref.double())).to(dtype)
    assert max_err(twice, ref) > pt_err
    assert_within_2x(twice, ref, pt, name="2x")


def test_2x_rule_fails_non_finite_and_wrong_shape():
    ref, pt = _case(torch.float16)
    nan = ref.to(torch.float16)
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_2x(nan, ref, pt)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_2x(ref[:4].to(torch.float16), ref, pt)


def test_fp32_is_held_to_tight_bounds_not_the_2x_rule():
    ref = torch.randn(64, 33, generator=torch.Generator().manual_seed(1))
    assert_within_2x(ref.clone(), ref, ref)
    close = ref + FP32_ATOL / 2
    assert_within_2x(close, ref, ref)
    # 2 x pt_err would allow anything here (pt == out); fp32 must still fail past atol + rtol
    off = ref.clone()
    off[5, 5] += 10 * (FP32_ATOL + FP32_RTOL * ref[5, 5].abs().item())
    with pytest.raises(AssertionError):
        assert_within_2x(off, ref, off)
    # a caller's floor replaces FP32_ATOL
    with pytest.raises(AssertionError):
        assert_within_2x(ref + 1e-3, ref, ref, floor=1e-4)
    assert_within_2x(ref + 1e-3, ref, ref, floor=2e-3)


def test_max_err_bound_helpers():
    a = torch.tensor([1.0, -2.0, 3.0])
    b = torch.tensor([1.0, -2.5, 3.25])
    assert max_err(a, b) == 0.5
    assert max_err(a[:0], b[:0]) == 0.0
    assert max_relative_bound(b, atol=1e-3, rtol=1e-2) == pytest.approx(1e-3 + 1e-2 * 3.25)
    assert_max_err(a, b, 0.5, "exact bound")
    with pytest.raises(AssertionError, match="x: max error 0.5 > bound 0.49"):
        assert_max_err(a, b, 0.49, "x")
    with pytest.raises(AssertionError):                   # NaN never passes
        assert_max_err(torch.tensor([float("nan")]), torch.tensor([0.0]), 1.0)
    assert row_sum_fp32_atol(3) == FP32_ATOL and row_sum_fp32_atol(100) == pytest.approx(1e-4)
    assert floor_for(torch.bfloat16) == ATOL_FLOOR[torch.bfloat16]
    assert floor_for(torch.float16, {torch.float16: 5.0}) == 5.0


def test_dot_fp32_bound_passes_fp32_sums_and_fails_a_dropped_term():
    """The linear bound: fp32 sums of k products in any order pass (a blocked GEMM, and a
    sequential sum, the worst order); one product left out fails, as does an fp32 value
    rounded to bf16; the floor of the 2x rule is twice the largest element bound."""
    from tolerances import EPS, assert_dot_fp32, dot_fp32_bound, linear_lowp_floor
    g = torch.Generator().manual_seed(2)
    k = 1000
    x, w = torch.randn(5, k, generator=g), torch.randn(7, k, generator=g)
    ref = x.double() @ w.double().T
    terms = x.double().abs() @ w.double().abs().T
    assert_dot_fp32(x @ w.T, ref, terms, k, "gemm")
    products = x[:, None, :] * w[None, :, :]                      # (5, 7, k) fp32
    sequential = torch.zeros(5, 7)
    for i in range(k):
        sequential += products[..., i]
    assert_dot_fp32(sequential, ref, terms, k, "sequential")
    with pytest.raises(AssertionError, match="dropped: .* over the k=1000 dot-product bound"):
        assert_dot_fp32(x[:, 1:] @ w[:, 1:].T, ref, terms, k, "dropped")
    with pytest.raises(AssertionError, match="bf16"):
        assert_dot_fp32((x @ w.T).bfloat16().float(), ref, terms, k, "bf16")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_dot_fp32(torch.full((5, 7), float("nan")), ref, terms, k)
    u = EPS[torch.float32] / 2
    bound = dot_fp32_bound(k, terms)
    assert torch.allclose(bound, terms * (k + 1) * u / (1 - (k + 1) * u), rtol=1e-12, atol=1e-40)
    assert linear_lowp_floor(k, terms) == pytest.approx(2 * bound.max().item())
    assert linear_lowp_floor(k, terms[:0]) == 0.0
