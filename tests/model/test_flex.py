"""Document masking through FlexAttention block masks equals the dense-mask path: full-sequence
layers and the gathered tokens of recursion steps (expert and token choice, recursive KV sharing).

Forward: the real compiled FlexAttention on CPU. Gradients: torch has no CPU FlexAttention
backward (it raises), so the gradient tests run torch's eager FlexAttention (its reference
implementation, which does have a backward once the CPU guard is lifted) with the same block
masks; on a GPU they run the compiled kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from megamor.model import flex, layers
from tests.model.helpers import mor

B, T = 2, 96

CASES = {
    "vanilla": {"router_type": "none", "sharing": "none", "nr": 1},
    "recursive": {"router_type": "none", "sharing": "cycle", "nr": 3},
    "mor_expert": {"router_type": "expert_choice", "sharing": "middle_cycle", "nr": 3},
    "mor_expert_kv_shared": {"router_type": "expert_choice", "sharing": "cycle", "nr": 2, "kv_mode": "shared"},
    "mor_token": {"router_type": "token_choice", "sharing": "middle_cycle", "nr": 3},
}


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of several documents each (different boundaries), positions restarting at each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 211, (B, T), generator=g)
    starts = [[0, 30, 31, 70], [0, 50]]  # a one-token document too
    doc = torch.zeros(B, T, dtype=torch.long)
    for r, s in enumerate(starts):
        for d, begin in enumerate(s):
            doc[r, begin:] = d
    first = torch.stack([torch.tensor(s)[doc[r]] for r, s in enumerate(starts)])
    pos = torch.arange(T).unsqueeze(0) - first
    return {"input_ids": ids, "targets": ids.roll(-1, 1), "doc_ids": doc, "position_ids": pos}


def build(case: str, device: str = "cpu"):
    kw = dict(CASES[case])
    model = mor(kw.pop("router_type"), kw.pop("sharing"), kw.pop("nr"), **kw).to(device)
    return model.train()  # training routing: expert choice's top-k gathers a subset per step


def loss_and_grads(model, batch, impl: str, grads: bool):
    model.doc_mask_impl = impl
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        out = model(batch["input_ids"], targets=batch["targets"], position_ids=batch["position_ids"],
                    doc_ids=batch["doc_ids"], attention_mask=batch.get("attention_mask"), return_logits=not grads)
        loss = out.loss + out.aux_loss
        if grads:
            loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.logits, g


@pytest.fixture
def dense_calls(monkeypatch):
    """How many dense masks the attention built."""
    calls = []
    real = layers.attention_mask

    def counting(q, kv):
        mask = real(q, kv)
        calls.append(mask is not None)
        return mask

    monkeypatch.setattr(layers, "attention_mask", counting)
    return calls


def test_flex_forward_equals_dense_on_cpu(dense_calls):
    """The compiled CPU kernel, without gradients (evaluation, validation): no dense mask at all."""
    for case in CASES:
        model, batch = build(case), packed_batch()
        dense_calls.clear()
        loss_d, logits_d, _ = loss_and_grads(model, batch, "dense", grads=False)
        assert any(dense_calls), case
        dense_calls.clear()
        loss_f, logits_f, _ = loss_and_grads(model, batch, "flex", grads=False)
        assert not any(dense_calls), f"{case}: a dense mask was built"
        assert torch.allclose(loss_f, loss_d, atol=1e-5, rtol=0), (case, loss_f, loss_d)
        assert torch.allclose(logits_f, logits_d, atol=1e-5, rtol=0), (case, (logits_f - logits_d).abs().max())


def test_flex_inside_compiled_layers_on_cpu():
    """trainer.compile=true: flex inside compiled layers. Before the fix inductor failed to build
    the CPU flex template inside the layer graph (C++ error 'cur_qSplitSize5 was not declared');
    the CPU kernel now runs in its own graph. A second batch (new block masks) still equals."""
    from megamor.train.compile import compile_layers

    model = build("mor_expert")
    dense = [loss_and_grads(model, packed_batch(s), "dense", grads=False)[0] for s in (0, 1)]
    compile_layers(model)
    for s in (0, 1):
        loss_f, _, _ = loss_and_grads(model, packed_batch(s), "flex", grads=False)
        assert torch.allclose(loss_f, dense[s], atol=1e-5, rtol=0), (s, loss_f, dense[s])


def test_flex_masks_documents():
    """The test can fail: without document ids in the block mask the loss changes."""
    model, batch = build("mor_expert"), packed_batch()
    loss_d, _, _ = loss_and_grads(model, batch, "dense", grads=False)
    one_doc = dict(batch, doc_ids=torch.zeros_like(batch["doc_ids"]))
    loss_one, _, _ = loss_and_grads(model, one_doc, "flex", grads=False)
    assert (loss_one - loss_d).abs() > 1e-4


@pytest.fixture
def eager_flex_with_backward(monkeypatch):
    """torch's eager FlexAttention (reference math, backward included) with the CPU guard lifted."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch_flex, "_validate_device", lambda *a: None)
        monkeypatch.setattr(flex, "_compiled", torch_flex.flex_attention)
        monkeypatch.setattr(flex, "flex_unusable", lambda device, needs_grad: None)
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_gradients_equal_dense(case, checkpointing, eager_flex_with_backward, dense_calls):
    device = eager_flex_with_backward
    if checkpointing and case not in ("vanilla", "mor_expert"):
        pytest.skip("checkpointing: one plain and one routed model")
    model = build(case, device)
    batch = {k: v.to(device) for k, v in packed_batch(1).items()}
    if checkpointing:
        model.enable_activation_checkpointing()
    loss_d, _, grads_d = loss_and_grads(model, batch, "dense", grads=True)
    dense_calls.clear()
    loss_f, _, grads_f = loss_and_grads(model, batch, "flex", grads=True)
    assert not any(dense_calls)
    assert torch.allclose(loss_f, loss_d, atol=1e-5, rtol=0), (loss_f, loss_d)
    assert grads_f.keys() == grads_d.keys()
    worst = max((grads_f[n] - grads_d[n]).abs().max().item() for n in grads_d)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("case", ["vanilla", "mor_expert", "mor_token"])
def test_flex_gradients_equal_dense_with_padding(case, eager_flex_with_backward):
    """Padded slots in the full sequence too (row 1 left-padded): the block mask drops them as
    keys; their own outputs are never used (targets -100)."""
    device = eager_flex_with_backward
    model, batch = build(case, device), packed_batch(2)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :7] = False
    batch["attention_mask"] = valid
    batch["targets"] = batch["targets"].masked_fill(~valid, -100)
    batch = {k: v.to(device) for k, v in batch.items()}
    loss_d, _, grads_d = loss_and_grads(model, batch, "dense", grads=True)
    loss_f, _, grads_f = loss_and_grads(model, batch, "flex", grads=True)
    assert torch.allclose(loss_f, loss_d, atol=1e-5, rtol=0), (loss_f, loss_d)
    worst = max((grads_f[n] - grads_d[n]).abs().max().item() for n in grads_d)
    assert worst < 1e-5, worst


def test_cpu_training_falls_back_to_dense(dense_calls, capsys):
    """Where FlexAttention has no backward (CPU), a gradient forward uses the dense mask and says so."""
    model, batch = build("mor_expert"), packed_batch()
    loss_d, _, grads_d = loss_and_grads(model, batch, "dense", grads=True)
    dense_calls.clear()
    flex._noted.clear()
    loss_f, _, grads_f = loss_and_grads(model, batch, "flex", grads=True)
    assert any(dense_calls)
    assert "no CPU backward" in capsys.readouterr().err
    assert torch.equal(loss_f, loss_d) and all(torch.equal(grads_f[n], grads_d[n]) for n in grads_d)


def test_decoding_cache_stays_dense():
    """A KV-cache forward builds its own metas: no block mask per decoded length."""
    model = build("mor_expert").eval()
    model.doc_mask_impl = "flex"
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), causal_routing=True, kv_cache=cache)
    assert all(not e.meta.block_masks for e in cache.entries.values())


def test_importing_the_model_leaves_flex_attention_and_dynamo_unimported():
    """FlexAttention is imported on first use: its import pulls in torch._dynamo (a large share of
    the start-up of every evaluation, export or decoding process that never masks documents)."""
    import subprocess
    import sys

    code = ("import sys, megamor.model, megamor.inference; "
            "print(sorted(m for m in ('torch._dynamo', 'torch.nn.attention.flex_attention') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    assert flex.flex_unusable(torch.device("cpu"), needs_grad=False) is None  # still found when asked
