"""GPU static report on a representative subset: compile Triton kernels for sm_80 and sm_90 (no
GPU needed) and check registers, shared memory, spills and tensor-core instructions.

The full report is `python -m benchmarks.gpu_static`; this test keeps to a few records per
family so it stays around a minute on two cores. Collected through tests/test_gpu_static.py
(directly, or in a child process when the suite runs under TRITON_INTERPRET=1).
"""

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks import gpu_static  # noqa: E402

ARCHS = (80, 90)


def _static_variant_type():
    gpu_static._kernels_package()
    from fastattn.kernels.static_variant import StaticVariant
    return StaticVariant


def _pick(variants, name, *needles):
    """The first variant of kernel `name` whose config contains every needle (else the last)."""
    of_name = [v for v in variants if v.name == name]
    if not of_name:
        return None
    for v in of_name:
        if all(n in v.config for n in needles):
            return v
    return of_name[-1]


def _subset(arch):
    """(family, variant): the biggest tiles of the row-wise kernels, and the common attention
    head dim in 16-bit (the tensor-core paths)."""
    mods = gpu_static.kernel_modules()
    picks = []
    wanted = {
        "softmax": [("softmax_fwd", "fp32", "mask=float", "loop"), ("softmax_fwd", "bf16",
                    "mask=bool", "BN=8192"), ("softmax_bwd", "fp32", "loop")],
        "layer_norm": [("ln_fwd", "fp32 res=1", "loop"), ("ln_fwd", "bf16 res=1", "BN=8192"),
                       ("ln_bwd", "fp32 dh=1", "BN=4096"), ("rms_bwd", "fp16 dh=1", "BN=128"),
                       ("ln_bwd_dx", "fp32 dh=1"), ("ln_bwd_stats", "fp32")],
        "rotary": [("rotary", "fp32", "gptj", "BH=16 BK=64"), ("rotary", "bf16", "neox",
                    "BH=16 BK=64")],
        "swiglu": [("swiglu_fwd", "bf16"), ("swiglu_bwd", "fp32"), ("swiglu_bwd", "fp16")],
        "attention": [("attention_fwd", "fp16", "d=128"), ("attention_bwd_dkdv", "bf16", "d=64"),
                      ("attention_bwd_dq", "fp16", "d=64"),
                      # the tightest tile: TF32 dK/dV at d=256 (head dim split on sm_90)
                      ("attention_bwd_dkdv", "tf32", "d=256 padded causal")],
        # fp32 decode tiles that spilled before their per-arch config (kernels/kvcache_attention.py)
        "kvcache_attention": [("kvcache_split", "fp32", "d=64 contiguous BM=32"),
                              ("kvcache_split", "fp32", "d=128 contiguous BM=32"),
                              ("kvcache_split", "fp32", "d=256 paged")],
    }
    for family, picks_of in wanted.items():
        if family not in mods:
            continue
        variants = mods[family].static_variants(arch)
        for name, *needles in picks_of:
            v = _pick(variants, name, *needles)
            if v is not None:
                picks.append((family, v))
    return picks


@pytest.fixture(scope="module")
def records():
    out = []
    for arch in ARCHS:
        for family, v in _subset(arch):
            out.append((family, gpu_static.compile_variant(v, arch)))
    return out


def test_subset_covers_every_family(records):
    families = {f for f, _ in records}
    assert {"softmax", "layer_norm", "rotary"} <= families
    assert {r["arch"] for _, r in records} == {"sm_80", "sm_90"}


@pytest.mark.parametrize("family", ["softmax", "layer_norm", "rotary", "attention",
                                    "kvcache_attention", "swiglu"])
def test_no_spills_and_within_limits(records, family):
    mine = [r for f, r in records if f == family]
    assert mine, f"no static records for kernels/{family}.py"
    bad = [(r["kernel"], r["config"], r["arch"], gpu_static.problems(r)) for r in mine
           if gpu_static.problems(r)]
    assert not bad, f"configurations that spill or exceed limits: {bad}"
    for r in mine:
        assert 0 < r["registers"] <= 255
        assert r["shared_bytes"] <= gpu_static.SHARED_LIMIT[int(r["arch"][3:])]


def test_attention_uses_tensor_cores(records):
    att = [r for f, r in records if f == "attention"]
    assert att, "no static records for kernels/attention.py"
    assert any(r["config"].startswith("tf32") and "DS=2" in r["config"] for r in att)
    for r in att:
        if r["config"].startswith(("fp16", "bf16", "tf32")):
            op = "HMMA" if r["arch"] == "sm_80" else "HGMMA"
            assert r["mma"][op] > 0, f"{r['kernel']} {r['config']} on {r['arch']}: no {op}"


# ---- the report's counters themselves, on kernels with a known answer -----------------------

@triton.jit
def _spilling_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + o)                       # BLOCK / 32 live values per thread
    tl.store(y_ptr + o, x / tl.sum(x * x, axis=0))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tile = r[:, None] * BLOCK + r[None, :]       # (BLOCK, BLOCK)
    c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile))
    tl.store(c_ptr + tile, c.to(tl.float16))


def test_counters_see_spills_and_mma():
    sv = _static_variant_type()
    spill = sv(_spilling_kernel, "spill", "", {"x_ptr": "*fp32", "y_ptr": "*fp32",
                                               "BLOCK": "constexpr"}, {"BLOCK": 8192},
               num_warps=1)
    rec = gpu_static.compile_variant(spill, 80)
    assert rec["spill_stores"] > 0 and rec["spill_loads"] > 0 and gpu_static.problems(rec)
    dot = sv(_dot_kernel, "dot", "", {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16",
                                      "BLOCK": "constexpr"}, {"BLOCK": 64}, num_warps=4)
    r80, r90 = gpu_static.compile_variant(dot, 80), gpu_static.compile_variant(dot, 90)
    assert r80["mma"]["HMMA"] > 0 and r80["mma"]["HGMMA"] == 0
    assert r90["mma"]["HGMMA"] > 0
    assert r80["shared_bytes"] > 0 and not gpu_static.problems(r80)


def test_cuda_records_shape():
    # the built extension's CUDA kernels (none when it is a CPU-only build)
    for r in gpu_static.cuda_records(ARCHS):
        assert r["source"] == "cuda" and r["arch"] in ("sm_80", "sm_90")
        assert set(r["mma"]) == {"HMMA", "HGMMA"}
        assert not gpu_static.problems(r), (r["kernel"], r["arch"], gpu_static.problems(r))


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_ln2_products_are_never_fused(arch):
    # The backward recomputes P = exp(fl(s2 * ln2) - lse) with lse = fl(m2 * ln2) + ln(l)
    # (kernels/_attention_common.py: natural_lse, scores(NATURAL=True)); at huge logits that is
    # exact only while each ln2 product is rounded on its own. An FFMA taking ln2 would fold
    # the product into the next add (error ~ulp(s), 1e4 at scale=1e10): only FMULs may.
    import subprocess
    import tempfile
    from fastattn.kernels._compat import ast_source
    from triton.backends.compiler import GPUTarget

    variants = gpu_static.kernel_modules()["attention"].static_variants(arch)
    for name in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"):
        v = _pick(variants, name, "fp16", "d=64")
        compiled = triton.compile(ast_source(v.kernel, v.signature, v.constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v.num_warps,
                                           "num_stages": v.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([gpu_static._tool("cuobjdump"), "-sass", f.name],
                                  capture_output=True, text=True, check=True).stdout
        users = [line.split("*/")[1].split()[0] for line in sass.splitlines()
                 if "0.693147" in line and "*/" in line]
        assert users, f"{name} on sm_{arch}: no ln2 product in the SASS (test is stale?)"
        assert set(users) == {"FMUL"}, f"{name} on sm_{arch}: ln2 used by {set(users)}"
