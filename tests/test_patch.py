"""fastattn.patch(model): in-place replacement of nn.MultiheadAttention / nn.LayerNorm /
nn.RMSNorm, and PyTorch Transformer layers trained on the patched modules."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

import fastattn

from conftest import TESTABLE_BACKENDS, backend_device
from tolerances import COMPOSED_FP32_TOL, FP32_TOL

FAST_BACKENDS = [b for b in TESTABLE_BACKENDS if b != "triton" and backend_device(b) == "cpu"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.layers = nn.ModuleList([nn.RMSNorm(16), nn.Linear(16, 16)])

    def forward(self, x):
        h = self.norm(x)
        return self.layers[1](self.layers[0](x + self.attn(h, h, h, need_weights=False)[0]))


def test_patch_replaces_in_place_and_reports(caplog):
    torch.manual_seed(0)
    model = Block().eval()
    params_before = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 5, 16)
    expected = model(x)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        out = fastattn.patch(model)
    assert out is model
    assert type(model.norm) is fastattn.LayerNorm
    assert type(model.attn) is fastattn.MultiHeadAttention
    assert type(model.layers[0]) is fastattn.RMSNorm
    assert type(model.layers[1]) is nn.Linear
    assert sorted(model.fastattn_patched) == sorted([
        ("norm", "LayerNorm", "LayerNorm"),
        ("attn", "MultiheadAttention", "MultiHeadAttention"),
        ("layers.0", "RMSNorm", "RMSNorm")])
    assert "replaced 3 modules" in caplog.text
    # the very same Parameter objects: optimizers built before patching keep working
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, **COMPOSED_FP32_TOL)
    # patching again changes nothing
    fastattn.patch(model)
    assert model.fastattn_patched == []


def test_patch_options_and_state():
    torch.manual_seed(0)
    model = Block().train()
    model.norm.eval()
    fastattn.patch(model, attention=False)
    assert type(model.attn) is nn.MultiheadAttention
    assert type(model.norm) is fastattn.LayerNorm and not model.norm.training
    assert model.layers[0].training
    fastattn.patch(model, norms=False)
    assert type(model.attn) is fastattn.MultiHeadAttention and model.attn.training


def test_patch_dtype_shared_root_and_refusals():
    torch.manual_seed(0)
    shared = nn.LayerNorm(8, dtype=torch.float64)
    model = nn.Sequential(shared, nn.Linear(8, 8, dtype=torch.float64), shared)
    fastattn.patch(model)
    assert model[0] is model[2] and type(model[0]) is fastattn.LayerNorm
    assert model[0].weight.dtype == torch.float64
    assert len(model.fastattn_patched) == 1

    root = fastattn.patch(nn.MultiheadAttention(8, 2))
    assert type(root) is fastattn.MultiHeadAttention
    assert root.fastattn_patched == [("", "MultiheadAttention", "MultiHeadAttention")]

    class MyNorm(nn.LayerNorm):
        pass

    hooked = nn.LayerNorm(8)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.Sequential(MyNorm(8), hooked)
    with pytest.warns(UserWarning, match="left 0 .*subclasses"):
        with pytest.warns(UserWarning, match="left 1 .*hooks"):
            fastattn.patch(model)
    assert type(model[0]) is MyNorm and model[1] is hooked
    with pytest.raises(TypeError, match="model"):
        fastattn.patch("not a model")


def test_patched_mha_keeps_state_dict_and_hooks_into_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = copy.deepcopy(model.state_dict())
    fastattn.patch(model)
    assert list(model.state_dict()) == list(state)
    x = torch.randn(3, 2, 8)
    model[0](x, x, x)[0].sum().backward()
    opt.step()
    assert not torch.equal(model[0].in_proj_weight, state["0.in_proj_weight"])


# ------------------------------------------------------------------ Transformer layers

def train_losses(model, batches, steps=3, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        for args, kwargs in batches:
            opt.zero_grad()
            out = model(*args, **kwargs)
            loss = out.square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_trains_like_pytorch(fast_backend, norm_first, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first)
    ref = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    ours = fastattn.patch(copy.deepcopy(ref))
    assert sum(t == "MultiHeadAttention" for _, _, t in ours.fastattn_patched) == 2
    n, length = 3, 10
    x = torch.randn((n, length, 32) if batch_first else (length, n, 32))
    mask = nn.Transformer.generate_square_subsequent_mask(length)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    kpm[1, 7:] = True
    batches = [((x,), dict(mask=mask, is_causal=True)),
               ((x,), dict(mask=torch.isinf(mask), src_key_padding_mask=kpm)),
               ((x,), dict(src_key_padding_mask=kpm))]
    with fastattn.record_dispatch() as calls:
        got = train_losses(ours, batches)
    want = train_losses(ref, batches)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert ("attention", fast_backend) in calls
    assert ("layer_norm", fast_backend) in calls


def test_transformer_decoder_trains_like_pytorch(fast_backend):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=48, dropout=0.0,
                                       batch_first=True)
    ref = nn.TransformerDecoder(layer, num_layers=2)
    ours = fastattn.patch(copy.deepcopy(ref))
    assert sum(t == "MultiHeadAttention" for _, _, t in ours.fastattn_patched) == 4
    tgt, memory = torch.randn(2, 9, 32), torch.randn(2, 7, 32)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(9)
    mem_kpm = torch.zeros(2, 7, dtype=torch.bool)
    mem_kpm[0, 5:] = True
    batches = [((tgt, memory), dict(tgt_mask=tgt_mask, tgt_is_causal=True,
                                    memory_key_padding_mask=mem_kpm)),
               ((tgt, memory), dict(tgt_mask=tgt_mask))]
    with fastattn.record_dispatch() as calls:
        got = train_losses(ours, batches)
    want = train_losses(ref, batches)
    torch.testing.assert_close(got, want, **FP32_TOL)
    assert calls.count(("attention", fast_backend)) >= 4


@pytest.mark.parametrize("padding", [False, True], ids=["dense", "key_padding"])
def test_transformer_eval_inference_runs_fastattn(fast_backend, padding):
    """Issue #12 item 7: in eval/no_grad nn.TransformerEncoderLayer takes PyTorch's fused fast
    path (and nn.TransformerEncoder its nested-tensor conversion with a padding mask), which
    never calls the swapped modules. Patched layers must run fastattn's kernels: the dispatch
    log proves it, not only the outputs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True)
    ref = nn.TransformerEncoder(layer, num_layers=2).eval()   # nested tensors enabled
    assert ref.use_nested_tensor and ref.layers[0].activation_relu_or_gelu
    ours = fastattn.patch(copy.deepcopy(ref))
    x = torch.randn(2, 6, 16)
    kwargs = {}
    if padding:
        kpm = torch.zeros(2, 6, dtype=torch.bool)
        kpm[1, 4:] = True
        kwargs["src_key_padding_mask"] = kpm
    for grad_mode in (torch.no_grad, torch.inference_mode):
        with grad_mode(), fastattn.record_dispatch() as calls:
            got = ours(x, **kwargs)
        with grad_mode():
            want = ref(x, **kwargs)
        if padding:     # PyTorch's nested path leaves padded rows 0; compare the real ones
            got, want = got[~kpm], want[~kpm]
        torch.testing.assert_close(got, want, **COMPOSED_FP32_TOL)
        assert calls.count(("attention", fast_backend)) == 2, calls
        assert calls.count(("layer_norm", fast_backend)) == 4, calls
    # the unpatched model still takes PyTorch's fast path (nothing fastattn runs)
    with torch.no_grad(), fastattn.record_dispatch() as calls:
        ref(x, **kwargs)
    assert calls == []


def test_patch_leaves_unswapped_encoder_fast_path_alone():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = fastattn.patch(nn.TransformerEncoder(layer, num_layers=1), attention=False,
                           norms=False)
    assert model.fastattn_patched == []
    assert model.layers[0].activation_relu_or_gelu == 1 and model.use_nested_tensor


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    with fastattn.use_backend(request.param):
        yield request.param
