"""benchmarks/gpu_bench.py (the benchmarks of scripts/gpu_check.sh) without a GPU: its case
plan, and a --dry-run on CPU whose JSON must carry the CPU benchmark JSON's schema."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import gpu_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_cases_cover_the_grid_against_each_sdpa_backend():
    names = ["flash", "cudnn", "efficient"]
    cases = gpu_bench.attention_cases(names)
    assert len(cases) == len(names) * 5 * 2 * 2 * 2 * 2
    seen = {(n, c.shape["S"], c.shape["D"], c.dtype, c.variant, c.direction) for n, c in cases}
    assert len(seen) == len(cases)
    assert {c.shape["S"] for _, c in cases} == {1024, 2048, 4096, 8192, 16384}
    assert {c.shape["D"] for _, c in cases} == {64, 128}
    assert {c.dtype for _, c in cases} == {torch.float16, torch.bfloat16}
    assert {c.variant for _, c in cases} == {"causal", "full"}
    assert {c.direction for _, c in cases} == {"fwd", "fwd+bwd"}
    for name, c in cases:
        assert c.baseline == f"F.scaled_dot_product_attention[{name}]"
        assert c.backend == "triton" and c.bound == "compute"
        assert c.shape["B"] * c.shape["S"] == gpu_bench.TOKENS
        assert c.shape["H"] * c.shape["D"] == gpu_bench.HIDDEN


def test_plan_puts_the_main_comparison_first():
    plan = gpu_bench.plan("cuda", ["flash", "cudnn"])
    first = plan[:40]
    assert all(n == "flash" and c.op == "attention" and c.dtype == torch.float16
               for n, c in first)
    ops = [c.op for n, c in plan[40:] if n is None]
    assert set(ops) == set(gpu_bench.ROWWISE_OPS)
    assert all(c.backend == "triton" for _, c in plan)
    assert [n for n, _ in plan[-80:]] == ["cudnn"] * 80
    assert len(plan) == 160 + len(ops)


def _keys_and_types(d):
    return {k: type(v) for k, v in d.items() if v is not None}


def test_dry_run_json_has_the_cpu_schema_plus_gpu_fields(tmp_path):
    cpu_json = tmp_path / "cpu.json"
    assert cli.main(["--quick", "--device", "cpu", "--ops", "rotary", "--backends", "cpu",
                     "--json", str(cpu_json), "--rounds", "1", "--no-memory"]) == 0
    cpu = json.loads(cpu_json.read_text())
    doc = gpu_bench.run(str(tmp_path / "gpu"), budget_s=600, rounds=1, dry_run=True,
                        log=open(os.devnull, "w"))
    on_disk = json.loads((tmp_path / "gpu" / "gpu_bench.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))

    assert set(cpu) <= set(on_disk)
    assert set(on_disk["gpu"]) >= {"name", "capability", "sm_count", "memory_gib"}
    assert on_disk["gpu_check"]["dry_run"] is True
    assert on_disk["gpu_check"]["skipped_for_budget"] == []
    for part in ("machine", "limits"):
        assert set(cpu[part]) <= set(on_disk[part]), part
    cpu_rec = next(r for r in cpu["results"] if r["status"] == "ok")
    results = on_disk["results"]
    assert {r["op"] for r in results} == {"attention", *gpu_bench.ROWWISE_OPS}
    assert all(r["status"] == "ok" for r in results), [r["error"] for r in results]
    for rec in results:
        missing = set(cpu_rec) - set(rec)
        assert not missing, (rec["case"], missing)
        for key, typ in _keys_and_types(cpu_rec).items():
            if rec[key] is not None and typ is not dict:
                assert isinstance(rec[key], typ) or (typ is float and isinstance(rec[key], int)), key
        assert "sdpa_backend" in rec
    attn = [r for r in results if r["op"] == "attention"]
    names = on_disk["gpu_check"]["sdpa_backends"]
    assert names and {r["sdpa_backend"] for r in attn} == set(names)
    assert all(r["fastattn_tflops"] == pytest.approx(r["fastattn_rate"] / 1e3) for r in attn)

    text = (tmp_path / "gpu" / "gpu_bench.txt").read_text()
    assert f"{len(results)} cases: {len(results)} ok" in text
    assert all(r["case"] in text for r in results)


def test_budget_cuts_cases_and_lists_them(tmp_path):
    limits = {"matmul_gflops": {"fp32": 100.0}, "copy_gbs": 10.0, "how": "test"}
    doc = gpu_bench.run(str(tmp_path), budget_s=0, rounds=1, dry_run=True,
                        log=open(os.devnull, "w"), limits=limits)
    assert doc["limits"] is limits
    plan = gpu_bench.plan("cpu", doc["gpu_check"]["sdpa_backends"], dry_run=True)
    assert doc["results"] == []
    assert len(doc["gpu_check"]["skipped_for_budget"]) == len(plan)


def test_without_a_gpu_the_gpu_check_says_so_and_exits_2(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout.strip() == ("gpu_check: no CUDA GPU visible to "
                                  f"{sys.executable} (or no torch); nothing run")
    bench = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", "--out", str(tmp_path)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bench.returncode == 2 and "no CUDA GPU" in bench.stderr
