"""Padding-free packed batches (DataCollatorWithFlattening): the same loss and every gradient
as the padded batch of the same sequences, served by fastattn.varlen_attention (no (S, S)
mask), with or without the collator's cu_seq_lens kwargs."""

import pytest
import torch

pytest.importorskip("transformers")

import fastattn  # noqa: E402
from fastattn.integrations.transformers import record_routes  # noqa: E402
from tolerances import COMPOSED_FP32_TOL, TIGHT_FP32_TOL

from hf_models import one_thread, build_pair  # noqa: E402

LENGTHS = (7, 3, 12, 1, 9)

_threads = pytest.fixture(autouse=True)(one_thread)


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]


def _padded(seqs):
    s = max(map(len, seqs))
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, x in enumerate(seqs):
        ids[b, :len(x)] = torch.tensor(x)
        mask[b, :len(x)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
@pytest.mark.parametrize("flash_kwargs", [True, False])
def test_packed_training_matches_padded(family, flash_kwargs):
    from transformers import DataCollatorWithFlattening
    _, model = build_pair(family)
    model.train()
    seqs = _sequences()
    ids, mask, labels = _padded(seqs)
    loss_pad = model(ids, attention_mask=mask, labels=labels).loss
    loss_pad.backward()
    want = _grads(model)
    model.zero_grad()

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs,
                                         return_position_ids=True)
    batch = collate([{"input_ids": x} for x in seqs])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    with fastattn.record_dispatch() as calls, record_routes() as routes:
        loss = model(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss, loss_pad, **COMPOSED_FP32_TOL)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, want[n], **COMPOSED_FP32_TOL,
                                   msg=lambda m: f"{family} {n}: {m}")
    assert routes == ["varlen"] * model.config.num_hidden_layers, routes
    ops = {op for op, _ in calls}
    assert "varlen_attention" in ops and "attention" not in ops, calls
    assert {b for _, b in calls} == {"cpu"}, calls


def test_packed_without_varlen_falls_back_to_block_mask(monkeypatch):
    """cu_seq_lens given but no varlen kernel: a block-diagonal mask on the dense kernel,
    never attention across sequence boundaries."""
    from fastattn.integrations import hf_attention
    monkeypatch.setattr(hf_attention, "_varlen_fn", lambda: None)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 10, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    class M(torch.nn.Module):
        is_causal = True
    with record_routes() as routes:
        out, _ = hf_attention.fastattn_attention_forward(
            M(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
            max_length_k=6)
    assert routes == ["masked"]
    parts = [torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True) for a, b in ((0, 4), (4, 10))]
    torch.testing.assert_close(out, torch.cat(parts, 2).transpose(1, 2), **TIGHT_FP32_TOL)
