"""The one tolerance module of the parity tests: every hand-picked bound lives here.

The rule (DESIGN.md, after FlashAttention): for fp16/bf16, compute the reference in fp32 or
fp64 (`ref`) and in the input dtype (`pt`, PyTorch's own error), then require

    max|out - ref| <= 2 * max|pt - ref| + floor(dtype)

for the output and for every gradient. fp32 paths get tight absolute/relative bounds.

API
  max_err(a, b)                       max |a - b| in float64 (0 for empty tensors)
  floor_for(dtype, table=ATOL_FLOOR)  the absolute floor of the 2x rule for a dtype
  bound_2x(pt, ref, floor)            2 * max|pt - ref| + floor
  max_relative_bound(ref, atol, rtol) atol + rtol * max|ref| (fp32 bounds relative to the
                                      result's magnitude, not elementwise)
  row_sum_fp32_atol(rows)             fp32 atol of a gradient summed over `rows` rows
  assert_max_err(out, ref, bound, name)         max|out - ref| <= bound, with a clear message
  assert_within_2x(out, ref, pt, floor=None, name="output")
        the rule: shapes equal, out finite; fp16/bf16 out: max|out - ref| <= bound_2x(...);
        fp32/fp64 out: torch.testing.assert_close(atol=floor or FP32_ATOL, rtol=FP32_RTOL)
  FP32_TOL, and named per-op bounds below, as `atol=, rtol=` dicts for assert_close.
  dot_fp32_bound(k, terms), linear_lowp_floor(k, terms), assert_dot_fp32(out, ref, terms, k)
        fp32 sums of k products (linear layers), bounded by their terms (below)

Per-op constants: where a file used a bound tighter (or differently shaped) than the defaults,
it keeps it under a name saying which tests use it and why. None is looser than the one the
test carried before this module existed.
"""

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------ the rule's defaults

# Tight fp32 bounds: kernels reorder fp32 sums, so a few ulps times the reduction depth.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
FP32_TOL = dict(atol=FP32_ATOL, rtol=FP32_RTOL)
# The absolute floor of the 2x rule: one ulp-level step of the dtype near 1.
ATOL_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
# Machine epsilon (the spacing at 1) of each dtype, for bounds counted in ulps.
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

# ------------------------------------------------------------------------ fp32, per kind of op

# One reduction deep, no products of rounded values (lse, LayerNorm/RMSNorm statistics and
# outputs against PyTorch's, HF rotary and packed paths, losses of identical runs): a tighter
# rtol than FP32_TOL.
TIGHT_FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# Elementwise fp32 ops with no reduction, or a short one (rotary, softmax backward on one row,
# merge of two states): a few ulps.
ELEMENTWISE_FP32_TOL = dict(atol=1e-6, rtol=1e-5)
# One or two fused operations per element (the Triton rotary kernel on strided views, the
# merged lse of two states against the fp64 oracle): both bounds at ~8 ulps.
ULP_FP32_TOL = dict(atol=1e-6, rtol=1e-6)
# A rotated, appended KV cache against rotating the same rows with fastattn.apply_rotary: the
# same fp32 arithmetic, absolute only.
ROTATED_CACHE_FP32_TOL = dict(atol=1e-6, rtol=0)
# MultiheadAttention's averaged attention weights (probabilities in [0, 1]): tight absolute.
MHA_WEIGHTS_FP32_TOL = dict(atol=1e-6, rtol=1e-4)
# Merged lse of two states whose lse spread is up to 1e4: log1p of the difference, fp32.
MERGE_LSE_FP32_TOL = dict(atol=1e-5, rtol=1e-6)
# Merged out against the fp64 oracle: fp32 math and one rounding, bounded relative to 1+|ref|
# elementwise (merge of two states), per output dtype.
MERGE_OUT_REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Composed fp32 paths: whole modules and models (MHA, HF models, patched modules, compiled
# graphs) chain several kernels and projections, so atol doubles FP32_ATOL.
COMPOSED_FP32_TOL = dict(atol=2e-5, rtol=1e-4)
# Parameter gradients of those modules sum over batch x sequence: atol 1e-4.
COMPOSED_FP32_GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
# torch.autograd.gradcheck of the fp64 attention op (finite differences at eps 1e-6).
GRADCHECK_ATOL = 1e-4
# softmax at logits ~5e9 with a clear maximum: the result is (nearly) one-hot; absolute only.
HUGE_LOGIT_SOFTMAX_FP32_TOL = dict(atol=1e-6, rtol=0)
# The CPU kernel's own exp (csrc/cpu/fast_exp.h) over the whole softmax range: ~17 ulps
# relative, no absolute slack (tiny values must be right relative to themselves).
CPU_EXP_FP32_TOL = dict(atol=0, rtol=2e-6)
# In-place rotary of fp16 (tests/test_rowwise_regressions.py, issue 12) against the fp32
# oracle: one rounding to the dtype (fp16's ulp is 2^-8 at |x| ~ 4) on top of the rotation.
INPLACE_ROTARY_LOWP_TOL = dict(atol=4e-3, rtol=4e-3)
# Rotary forward then its conjugate (round trip) must give x back: fp32 a few ulps; fp16/bf16
# two roundings of values up to ~8 (randn * 2) in bf16 (ulp 2^-5 at 8).
ROTARY_ROUNDTRIP = {torch.float32: 1e-5, torch.float16: 0.1, torch.bfloat16: 0.1}

# ------------------------------------------------------------------------ Triton kernel files
# The interpreter tests of the Triton kernels (tests/test_*_triton.py) compare against an fp32
# reference. fp32 bounds are relative to the result's magnitude (max_relative_bound).

# Softmax outputs are probabilities <= 1: floors far below one ulp of the dtype near 1.
SOFTMAX_TRITON_FLOOR = {torch.float16: 1e-5, torch.bfloat16: 1e-4}
SOFTMAX_TRITON_FP32 = dict(atol=2e-6, rtol=2e-5)
# LayerNorm/RMSNorm and rotary: one rounding of the output per element, floors of 1/10 ulp.
ROWWISE_TRITON_FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
LAYER_NORM_TRITON_FP32 = dict(atol=1e-5, rtol=1e-5)
ROTARY_TRITON_FP32 = dict(atol=1e-6, rtol=1e-6)
# Attention (Triton launchers, and the attention fuzz against an fp64 oracle): fp32 sums over
# the keys in tiles, ~20 ulps of max|ref| (plus the fuzz oracle's own fp32 error there).
ATTENTION_FP32 = dict(atol=2e-5, rtol=2e-5)
# The attention fuzz's lse (fp32 for every input dtype) against the fp64 oracle: logits of
# low-precision inputs are rounded to the dtype first, so 1e-4 relative to 1 + max|lse|.
ATTENTION_FUZZ_LSE = dict(atol=1e-4, rtol=1e-4)
# Triton decode (split-K) against the plain path on the same inputs: the same math in another
# fp32 summation order, then one rounding to the output dtype (probabilities-weighted values).
ATTENTION_TRITON_SPLIT_VS_PLAIN = {torch.float32: 1e-5, torch.float16: 2e-3,
                                   torch.bfloat16: 2e-3}
# Triton softmax backward in fp32 against autograd of the fp64 reference (strict <).
SOFTMAX_TRITON_BACKWARD_FP32_ATOL = 1e-5
# Triton LayerNorm of rows with mean 1000 and std 1 (the long-row path's shifted sums must not
# lose the variance to cancellation) against fp64 (strict <): fp32 rounding of x at 1000 is
# ~6e-5, normalised by std 1.
LAYER_NORM_TRITON_LARGE_MEAN_ATOL = 1e-3

# ------------------------------------------------------------------------ fuzz tests

# tests/fuzz_support.check: fp32 is held to the 2x rule too, with a floor of ~20 fp32 ulps of
# the reference's magnitude (covers reordered sums and the kernels' ~3-ulp exp).
FUZZ_FP32_REL_FLOOR = 2e-6
# tests/test_fuzz_varlen.py: the 2x rule for every dtype with a floor relative to max(1, |ref|)
# (fp64: the backward recomputes P from the contract's fp32 lse: ~6e-8 * |lse| per logit, so
# that floor is scaled by max|lse| too).
VARLEN_FUZZ_FLOOR = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 1e-3,
                     torch.bfloat16: 8e-3}
VARLEN_FUZZ_LSE_REL_FLOOR = 1e-5
# tests/test_varlen_attention.py: fp32 lse of fp16/bf16 inputs against the fp32 oracle
# (the logits themselves are rounded to the dtype), absolute.
VARLEN_LSE_LOWP_ATOL = 2e-2
# tests/kvcache_oracle.py: lse (always fp32) of fp32 inputs against an fp64 oracle; for fp16/
# bf16 inputs the 2x rule with this floor (the logits themselves are rounded to the dtype).
KVCACHE_LSE_FP32_ATOL = 1e-4
KVCACHE_LSE_LOWP_FLOOR = 2e-2
# tests/kvcache_oracle.py: appended cache rows, two roundings of the dtype (atol = rtol).
KVCACHE_APPEND_ULPS = {torch.float32: 2e-6, torch.float16: 2 * 2.0 ** -10,
                       torch.bfloat16: 2 * 2.0 ** -7}


# ------------------------------------------------------------------------ inner products (linear)
# tests/test_linear.py, tests/test_fuzz_linear.py: an output (or gradient) of a linear layer is
# a sum of k products (+ a bias), compared with the fp64 oracle on the same inputs. FP32_TOL
# does not fit it: its bounds scale with the result, but a sum's rounding error scales with its
# terms, so an output near 0 made of cancelling products is off by ~sqrt(k) ulps of the terms,
# not of itself (k = 1376 at |x|, |w| ~ 1: F.linear's own fp32 error is ~3e-5 on outputs near
# 0). The bound is the standard one for a dot product (Higham, Accuracy and Stability of
# Numerical Algorithms, 2nd ed., sec. 3.1), which holds for any summation order (lanes, blocks,
# trees) with or without FMA, so it is earned by every correct kernel, not fitted to one: with
# u = 2^-24 and gamma_n = n u / (1 - n u),
#     |fl(sum_i x_i y_i + b) - (sum_i x_i y_i + b)| <= gamma_{k+1} (sum_i |x_i y_i| + |b|)
# elementwise (k products and k - 1 additions, and the bias one more). Underflow adds at most
# 2^-150 (half the fp32 subnormal spacing) per operation whose result is subnormal, 2(k+1) of
# them. The fp64 oracle's own error (gamma_k in 2^-53) is 2^29 times smaller: not counted.
# fp16/bf16 (fp32 accumulation): the kernel rounds its fp32 sum a (|a - y| within that bound
# of the exact y) once, to nearest, so |rd(a) - a| <= |q - a| for every finite value q of the
# dtype, PyTorch's result pt among them, and its error is |rd(a) - y| <= |pt - y| + 2 |a - y|:
# the 2x rule holds with the floor 2 max(bound) (linear_lowp_floor), which scales with the
# magnitudes where ATOL_FLOOR is absolute (tiny inputs would pass anything under 1e-3).


def dot_fp32_bound(k, terms):
    """Elementwise bound on the fp32 rounding error of sums of k products plus one addition
    (the bias): gamma_{k+1} * terms + 2 (k + 1) 2^-150, where terms (float64) holds
    sum_i |x_i y_i| (+ |b|) per element."""
    n = k + 1
    u = EPS[torch.float32] / 2
    return terms.double() * (n * u / (1 - n * u)) + 2 * n * 2.0 ** -150


def linear_lowp_floor(k, terms):
    """The 2x rule's floor for fp16/bf16 results of fp32-accumulated sums of k products:
    2 * max dot_fp32_bound(k, terms) (see above)."""
    return 2 * dot_fp32_bound(k, terms).max().item() if terms.numel() else 0.0


def assert_dot_fp32(out, ref, terms, k, name="output"):
    """fp32 `out` of sums of k products against the fp64 `ref`, elementwise within
    dot_fp32_bound(k, terms); names the worst element when it is not."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if not out.numel():
        return
    err = (out.double() - ref.double()).abs()
    bound = dot_fp32_bound(k, terms)
    over = err > bound
    if over.any():
        i = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{name}: {int(over.sum())} elements over the k={k} dot-product bound; worst: "
            f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g} "
            f"(sum |terms| {terms.flatten()[i].item():.3g})")


# ------------------------------------------------------------------------ helpers

def max_err(a, b):
    """max |a - b| in float64; 0.0 for empty tensors."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floor_for(dtype, table=None):
    """The absolute floor of the 2x rule for `dtype` (default table: ATOL_FLOOR)."""
    return (ATOL_FLOOR if table is None else table)[dtype]


def bound_2x(pt, ref, floor):
    """2 * max|pt - ref| + floor: the most a kernel output may be off `ref`."""
    return 2 * max_err(pt, ref) + floor


def max_relative_bound(ref, atol, rtol):
    """atol + rtol * max|ref|: a tight fp32 bound scaled by the result's magnitude."""
    return atol + rtol * (ref.double().abs().max().item() if ref.numel() else 0.0)


def row_sum_fp32_atol(rows):
    """fp32 atol for a gradient summed over `rows` rows (LayerNorm/RMSNorm dweight, dbias):
    FP32_ATOL, growing by 1e-6 per row past 10 rows (each row adds rounding to the sum)."""
    return max(FP32_ATOL, 1e-6 * rows)


def assert_max_err(out, ref, bound, name="output"):
    """max|out - ref| <= bound, naming the tensor and both numbers when it is not."""
    err = max_err(out, ref)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"


def assert_within_2x(out, ref, pt, floor=None, name="output"):
    """The DESIGN.md rule. fp16/bf16 `out`: max|out - ref| <= 2 * max|pt - ref| + floor
    (default floor_for(out.dtype)). fp32/fp64 `out`: tight bounds against `ref`,
    atol = floor (default FP32_ATOL), rtol = FP32_RTOL, elementwise."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.dtype in LOW_PRECISION:
        floor = floor_for(out.dtype) if floor is None else floor
        pt_err = max_err(pt, ref)
        err = max_err(out, ref)
        assert err <= 2 * pt_err + floor, \
            f"{name}: max error {err:.3g} > 2 x {pt_err:.3g} + {floor}"
    else:
        torch.testing.assert_close(out.double(), ref.double(),
                                   atol=FP32_ATOL if floor is None else floor,
                                   rtol=FP32_RTOL, msg=lambda m: f"{name}: {m}")


def assert_max_err_2x(out, ref, pt, name, *, fp32, floors):
    """The max-error form of the rule, for the Triton row-wise parity tests: fp32 `pt` -> the
    bound max_relative_bound(ref, **fp32); fp16/bf16 -> 2 * max|pt - ref| + floors[dtype].
    Also checks that out is finite and has pt's dtype."""
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype}, expected {pt.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if pt.dtype == torch.float32:
        bound = max_relative_bound(ref, **fp32)
    else:
        bound = bound_2x(pt, ref, floors[pt.dtype])
    assert_max_err(out, ref, bound, name)
