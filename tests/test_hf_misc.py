"""The transformers integration beyond per-family parity: optional dependency, explicit
registration, torch.compile, the triton backend (TRITON_INTERPRET=1), the examples."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import COMPOSED_FP32_TOL

from fastattn.kernels._compat import interpreting

ROOT = Path(__file__).resolve().parents[1]


# subprocesses of tiny models: one thread each (no oversubscription of the CI's cores)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=ENV)


def test_import_fastattn_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import fastattn, fastattn.integrations\n"
            "import fastattn.integrations.transformers as t\n"
            "assert not t.is_registered()\n"
            "m = fastattn.patch(__import__('torch').nn.Linear(2, 2))\n"
            "try:\n    t.register()\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "fastattn[transformers]" in r.stdout


def test_import_fastattn_registers_nothing():
    pytest.importorskip("transformers")
    r = _run("import fastattn, transformers\n"
             "from transformers import AttentionInterface\n"
             "from transformers.masking_utils import AttentionMaskInterface\n"
             "assert 'fastattn' not in AttentionInterface._global_mapping\n"
             "assert 'fastattn' not in AttentionMaskInterface._global_mapping\n"
             "import fastattn.integrations.transformers as t\n"
             "assert 'fastattn' not in AttentionInterface._global_mapping\n"
             "t.register(); assert t.is_registered()\n")
    assert r.returncode == 0, r.stderr


def test_from_config_and_set_attn_implementation():
    pytest.importorskip("transformers")
    from hf_models import config_for
    from fastattn.integrations.transformers import record_routes, register
    register()
    cls, cfg, _ = config_for("llama")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn").eval()
    assert m.config._attn_implementation == "fastattn"
    with torch.no_grad(), record_routes() as routes:
        m(torch.randint(3, 128, (1, 6)))
    assert routes == ["dense", "dense"]
    m.set_attn_implementation("sdpa")
    m.set_attn_implementation("fastattn")
    assert m.config._attn_implementation == "fastattn"


@pytest.mark.parametrize("patched", [False, True])
def test_torch_compile_forward(patched):
    """torch.compile traces the attention function and the custom ops (aot_eager: the graph
    capture without inductor's C++ compile time); patched: norms and rotary too."""
    pytest.importorskip("transformers")
    from hf_models import build_pair
    import fastattn
    ref, new = build_pair("llama", patch=patched)
    ids = torch.randint(3, 128, (2, 11))
    compiled = torch.compile(new, backend="aot_eager", fullgraph=False)
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        got = compiled(ids).logits
        want = ref(ids).logits
    torch.testing.assert_close(got, want, **COMPOSED_FP32_TOL)
    assert ("attention", "cpu") in calls


def test_torch_compile_inductor_forward():
    """torch.compile(model) with its default backend, inductor (it generates and compiles C++
    for the graph around fastattn's custom ops), on a patched model: attention, norms and
    rotary all run as fastattn's CPU kernels inside the compiled graph."""
    pytest.importorskip("transformers")
    from hf_models import build_pair
    import fastattn
    ref, new = build_pair("llama", patch=True)
    ids = torch.randint(3, 128, (2, 11))
    compiled = torch.compile(new)
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        got = compiled(ids).logits
        want = ref(ids).logits
    torch.testing.assert_close(got, want, **COMPOSED_FP32_TOL)
    assert {("attention", "cpu"), ("rms_norm", "cpu"), ("rotary", "cpu")} <= set(calls), calls


@pytest.mark.skipif(not interpreting(),
                    reason="the triton backend runs CPU tensors only with TRITON_INTERPRET=1")
def test_triton_backend_two_layer_llama():
    pytest.importorskip("transformers")
    from hf_models import build_pair, padded_batch
    import fastattn
    ref, new = build_pair("llama")
    ref.train()
    new.train()
    ids, mask = padded_batch([6, 4], 6, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    loss_ref = ref(ids, attention_mask=mask, labels=labels).loss
    loss_ref.backward()
    with fastattn.use_backend("triton"), fastattn.record_dispatch() as calls:
        loss = new(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    torch.testing.assert_close(loss, loss_ref, **COMPOSED_FP32_TOL)
    want = dict(ref.named_parameters())
    for n, p in new.named_parameters():
        torch.testing.assert_close(p.grad, want[n].grad, **COMPOSED_FP32_TOL,
                                   msg=lambda m: f"{n}: {m}")
    ops = {op for op, _ in calls}
    assert {"attention", "rms_norm", "rotary"} <= ops, calls
    assert {b for _, b in calls} == {"triton"}, calls


@pytest.mark.parametrize("script,args", [
    ("hf_generate.py", ["--batch", "2", "--prompt-len", "12", "--new-tokens", "6"]),
    ("hf_train_packed.py", ["--steps", "2", "--sequences", "3", "--max-len", "24"]),
])
def test_examples_run(script, args):
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("identical tokens: True" in r.stdout
            or "losses equal within fp32 rounding: True" in r.stdout), r.stdout
