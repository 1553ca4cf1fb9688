"""fastattn.patch(model): in-place replacement of nn.MultiheadAttention / nn.LayerNorm /
nn.RMSNorm, and PyTorch Transformer layers trained on the patched modules."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

import fastattn

from conftest import TESTABLE_BACKENDS, backend_device

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
    torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)
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
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
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
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert calls.count(("attention", fast_backend)) >= 4


def test_transformer_eval_inference_path():
    """In eval/no-grad, PyTorch's layers may take their native fast path; results agree."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True)
    ref = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    ours = fastattn.patch(copy.deepcopy(ref))
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-4)


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    with fastattn.use_backend(request.param):
        yield request.param
