"""The benchmark machinery: the gate fails on a slower kernel, on a missing kernel and on a
wrong result, does not fail on a case new to the baseline, and the CLI's JSON follows the
schema in benchmarks/README.md."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:          # benchmarks/ is not installed; plain `pytest` runs need this
    sys.path.append(REPO)

from benchmarks import gate, runner  # noqa: E402
from benchmarks.cases import common, softmax  # noqa: E402


def _cheap_case():
    # The compiled kernel when built, else the torch backend: the gate machinery is the same.
    from fastattn import available_backends
    backend = "cpu" if "cpu" in available_backends("cpu") else "torch"
    return softmax._case(1024, 1024, torch.float32, "fwd", backend)


@pytest.fixture
def one_thread():
    # One thread: on a loaded 2-core machine a 2-thread parallel region can stall for
    # milliseconds waiting for a descheduled worker, which swamps a ~1 ms case.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _measure(case, slowdown=1):
    # Many short interleaved rounds: each fastattn/PyTorch pair is timed close together.
    return gate.measure([case], slowdown=slowdown, rounds=15, min_round_ms=5.0,
                        progress=False)[0]


def test_gate_fails_on_injected_slowdown(one_thread):
    case = _cheap_case()
    base = _measure(case)
    assert base["status"] == "ok", base
    baseline = {case.id: {"speedup": base["speedup"]}}
    # Running the fastattn callable 8x per call cuts its speedup ~8x, so the gate must fail
    # even when machine noise moves either measurement by 2x (seen on a shared 2-core box).
    slow = _measure(case, slowdown=8)
    assert slow["fastattn_ms"] > 3 * base["fastattn_ms"], (slow, base)
    rows, failed = gate.compare([slow], baseline, remeasure=lambda r: _measure(case, 8))
    assert failed and rows[0][2] == "SLOWER", gate.format_table(rows)


def test_gate_threshold():
    rec = {"case": "c", "status": "ok", "error": None, "speedup": 2.0, "fastattn_ms": 1.0,
           "torch_ms": 2.0}
    baseline = {"c": {"speedup": 2.0}}
    for speedup, fails in ((2.0, False), (3.0, False), (1.7, False), (1.59, True), (0.5, True)):
        rows, failed = gate.compare([dict(rec, speedup=speedup)], baseline)
        assert failed is fails, (speedup, gate.format_table(rows))
    # A below-threshold case that is fine when measured again passes; slow twice fails.
    _, failed = gate.compare([dict(rec, speedup=1.0)], baseline,
                             remeasure=lambda r: dict(r, speedup=1.9))
    assert not failed
    _, failed = gate.compare([dict(rec, speedup=1.0)], baseline,
                             remeasure=lambda r: dict(r, speedup=1.2))
    assert failed


def test_gate_bar_is_the_median_baseline_pass():
    rec = {"case": "c", "status": "ok", "speedup": 2.0, "fastattn_ms": 1.0, "torch_ms": 2.0}
    baseline = {"c": {"speedup": 4.0, "speedup_runs": [4.0, 2.3, 4.8]}}
    _, failed = gate.compare([dict(rec, speedup=3.2)], baseline)     # >= 0.8 * 4.0
    assert not failed
    _, failed = gate.compare([dict(rec, speedup=3.1)], baseline)     # <  0.8 * 4.0
    assert failed
    # the slowest pass (2.3) is not the bar: 1.9 used to pass
    _, failed = gate.compare([dict(rec, speedup=1.9)], baseline)
    assert failed


def test_gate_holds_overhead_cases_to_issue_13_bar():
    """Per-call overhead cases fail below 1/1.5 of PyTorch's speed whatever their baseline."""
    case = gate.OVERHEAD_CASES[0]
    rec = {"case": case, "status": "ok", "error": None, "fastattn_ms": 1.0, "torch_ms": 1.0}
    low_baseline = {case: {"speedup": 0.5}}
    _, failed = gate.compare([dict(rec, speedup=0.6)], low_baseline)    # >= 0.8 * 0.5
    assert failed
    _, failed = gate.compare([dict(rec, speedup=0.7)], low_baseline)
    assert not failed
    assert gate.threshold("other", {"speedup": 0.5}) == pytest.approx(0.4)


def _committed_baseline():
    baseline = gate.load_baseline(gate.BASELINE)
    assert set(baseline) == set(gate.GATE_CASES), "baseline.json must cover every gate case"
    return baseline


def _record_from_timings(case, fastattn_ms, torch_ms):
    return {"case": case, "status": "ok", "error": None, "fastattn_ms": fastattn_ms,
            "torch_ms": torch_ms, "speedup": torch_ms / fastattn_ms}


@pytest.mark.parametrize("case", gate.GATE_CASES)
def test_gate_fails_on_injected_1_5x_slowdown_of_each_op(case):
    """Issue #12 item 8: the committed baseline catches a 1.5x slower fastattn kernel in every
    gate case, also when the re-measurement is as slow, and passes the baseline's own median
    timings. The slowdown is injected into the baseline's measured timings (no benchmarking
    here): fastattn's median time x 1.5, PyTorch's unchanged."""
    base = _committed_baseline()[case]
    ok = _record_from_timings(case, base["fastattn_ms"], base["torch_ms"])
    # the median timings of the baseline pass against the median speedup of its passes
    assert ok["speedup"] >= (1 - gate.TOLERANCE) * gate.bar(base), (ok, base)
    rows, failed = gate.compare([ok], {case: base})
    assert not failed, gate.format_table(rows)
    slow = _record_from_timings(case, 1.5 * base["fastattn_ms"], base["torch_ms"])
    rows, failed = gate.compare([slow], {case: base}, remeasure=lambda r: dict(r))
    assert failed and rows[0][2] == "SLOWER", gate.format_table(rows)


def test_gate_fails_on_2_2x_slower_layer_norm():
    """The issue's reproduction: a layer_norm forward 2.2x slower passed the old bar (the
    slowest baseline pass, 0.56x, minus 20%)."""
    case = "layer_norm/M=4096,N=4096/fp32/fwd/cpu"
    base = _committed_baseline()[case]
    slow = _record_from_timings(case, 2.2 * base["fastattn_ms"], base["torch_ms"])
    rows, failed = gate.compare([slow], {case: base}, remeasure=lambda r: dict(r))
    assert failed, gate.format_table(rows)


def test_gate_fails_on_missing_kernel_but_not_on_new_case():
    def build(device):
        raise NotImplementedError("kernel not written")
    missing = common.Case(op="softmax", shape={"M": 1, "N": 1}, dtype=torch.float32,
                          direction="fwd", backend="torch", baseline="torch.softmax",
                          build=build)
    rec = runner.run_case(missing, "cpu", rounds=1, min_round_ms=0, measure_memory=False)
    assert rec["status"] == "unavailable" and "kernel not written" in rec["error"]
    _, failed = gate.compare([rec], {missing.id: {"speedup": 1.0}})
    assert failed
    _, failed = gate.compare([rec], {})            # missing from the baseline: still a failure
    assert failed

    new = dict(rec, status="ok", error=None, speedup=1.0, fastattn_ms=1.0, torch_ms=1.0)
    rows, failed = gate.compare([new], {})
    assert not failed and rows[0][2] == "NEW"
    rows, failed = gate.compare([dict(new, status="mismatch", error="wrong")], {})
    assert failed and rows[0][2] == "MISMATCH"


def test_baseline_is_the_median_of_passes_and_needs_every_case(tmp_path):
    rec = {"case": "c", "status": "ok", "error": None, "fastattn_ms": 1.0, "torch_ms": 2.0}
    runs = [[dict(rec, speedup=v)] for v in (2.0, 9.0, 1.8)]
    path = tmp_path / "baseline.json"
    gate.write_baseline(str(path), runs, {"cpu": "test"})
    assert gate.load_baseline(str(path))["c"]["speedup"] == 2.0
    with pytest.raises(RuntimeError, match="did not run"):
        gate.write_baseline(str(path), [[dict(rec, status="unavailable", speedup=None)]], {})


def test_keep_lower_keeps_the_slower_machines_baseline(tmp_path):
    """--keep-lower: a case keeps its existing entry where that is lower (measured on another
    machine type CI runs on) and takes the new median where that is lower; each entry says
    which machine measured it."""
    rec = {"status": "ok", "error": None, "fastattn_ms": 1.0, "torch_ms": 2.0}
    path = str(tmp_path / "baseline.json")
    gate.write_baseline(path, [[dict(rec, case="a", speedup=2.0), dict(rec, case="b", speedup=1.0)]],
                        {"cpu": "first"})
    gate.write_baseline(path, [[dict(rec, case="a", speedup=1.5), dict(rec, case="b", speedup=3.0)]],
                        {"cpu": "second"}, keep_lower=True)
    base = gate.load_baseline(path)
    assert (base["a"]["speedup"], base["a"]["cpu"]) == (1.5, "second")
    assert (base["b"]["speedup"], base["b"]["cpu"]) == (1.0, "first")


def test_gate_cases_resolve():
    assert [c.id for c in gate.gate_cases()] == list(gate.GATE_CASES)


def _tiny_gpt():
    from benchmarks.gpt import GPTConfig
    return GPTConfig(vocab=256, layers=1, d_model=64, heads=2, seq=32), 2


def test_e2e_losses_agree_and_a_broken_model_is_caught():
    from fastattn import available_backends
    backend = "cpu" if "cpu" in available_backends("cpu") else "torch"
    import fastattn
    from benchmarks import e2e
    train, prefill = e2e.run("cpu", backend, rounds=1, model=_tiny_gpt())
    assert train["status"] == "ok", train   # "unavailable" would mean the modules broke
    assert train["loss_max_rel_diff"] <= e2e.LOSS_RTOL
    assert train["fastattn_tokens_per_s"] > 0 and prefill["fastattn_tokens_per_s"] > 0

    def broken_patch(model):    # same weights, but the final norm's eps is wrong
        model = fastattn.patch(model)
        model.ln_f.eps = 0.5
        return model
    train, _ = e2e.run("cpu", backend, rounds=1, model=_tiny_gpt(), patch=broken_patch)
    assert train["status"] == "mismatch", train


RECORD_KEYS = {"op": str, "case": str, "variant": str, "shape": dict, "shape_str": str,
               "dtype": str, "direction": str, "backend": str, "baseline": str, "device": str,
               "bound": str, "flops": float, "bytes": float, "status": str}
TIMED_KEYS = ("fastattn_ms", "torch_ms", "speedup", "fastattn_rate", "torch_rate",
              "max_abs_diff", "max_scaled_diff")


def test_cli_json_schema(tmp_path):
    out = tmp_path / "softmax.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "softmax",
                          "--rounds", "3", "--json", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"machine", "limits", "results"}
    for key in ("cpu", "threads", "gpu", "torch", "triton", "commit", "fastattn_build"):
        assert key in doc["machine"], key
    assert doc["machine"]["threads"] == 2
    assert doc["limits"]["copy_gbs"] > 0 and doc["limits"]["matmul_gflops"]["fp32"] > 0
    results = doc["results"]
    assert {(r["op"], r["direction"]) for r in results} == {("softmax", "fwd"),
                                                            ("softmax", "fwd+bwd")}
    for r in results:
        for key, typ in RECORD_KEYS.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert r["status"] in ("ok", "unavailable", "mismatch")
        if r["status"] == "unavailable":
            assert r["error"]
            continue
        for key in TIMED_KEYS:
            assert isinstance(r[key], float) and r[key] >= 0, (key, r[key])
        assert r["fastattn_ms"] == statistics.median(r["fastattn_ms_rounds"])
        assert r["torch_ms"] == statistics.median(r["torch_ms_rounds"])
        ratios = [p / f for f, p in zip(r["fastattn_ms_rounds"], r["torch_ms_rounds"])]
        assert min(ratios) <= r["speedup"] <= max(ratios)
        assert r["rate_unit"] == "GB/s"
        assert r["fastattn_rate"] == pytest.approx(r["bytes"] / r["fastattn_ms"] / 1e6)
        if r["direction"] == "fwd+bwd":
            assert r["peak_mem_torch"] is None or r["peak_mem_torch"] > 0
