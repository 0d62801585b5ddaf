"""The planner's activation bytes against the bytes a real forward saves for backward
(SavedTensorMeter): vanilla, recursive, MoR expert and token choice, with and without
activation checkpointing, fp32 and bf16, TP 1 and TP 2 (two gloo processes), TP 2 with sequence
parallelism. The issue asks
for 15%; the walk of the forward is within a few percent, so 5% is held here."""

from __future__ import annotations

import itertools

import pytest
import torch

from megamor.model import MoRLM
from megamor.observe.activation_memory import SavedTensorMeter
from megamor.plan.activations import ActivationSpec, activation_bytes, observed_step_lengths, recompute_bytes
from megamor.testing.distributed import run_distributed
from tests.model.helpers import tiny_config

TOLERANCE = 0.05
VOCAB = 256  # divisible by TP 2
B, T = 2, 48
CASES = {
    "vanilla": {"n_layers": 4},
    "recursive": {"sharing": "middle_cycle", "num_recursions": 2, "n_layers": 6},
    "mor_expert": {"sharing": "middle_cycle", "num_recursions": 3, "n_layers": 8, "router": {"type": "expert_choice"}},
    "mor_token": {"sharing": "middle_cycle", "num_recursions": 3, "n_layers": 8, "router": {"type": "token_choice"}},
}


def _measure(case: str, checkpointing: bool, precision: str, tp_group=None, sequence_parallel: bool = False,
             documents: bool = False) -> tuple[float, float]:
    """(measured bytes, planned bytes) of one training forward, as the trainer runs it."""
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, **CASES[case])
    model = MoRLM(cfg)
    tp = 1
    if tp_group is not None:
        from megamor.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, tp_group)
        tp = torch.distributed.get_world_size(tp_group)
        if sequence_parallel:
            from megamor.parallel.sequence_parallel import apply_sequence_parallel

            apply_sequence_parallel(model, tp_group)
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32).train()  # as DeepSpeed casts it
    if checkpointing:
        model.enable_activation_checkpointing()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (B, T), generator=g)
    kw = {}
    if documents:  # data.document_masking: two documents per row, positions restart at the second
        doc = (torch.arange(T) >= T // 3).long().expand(B, T).contiguous()
        kw = {"doc_ids": doc, "position_ids": torch.where(doc == 0, torch.arange(T), torch.arange(T) - T // 3)}
    with SavedTensorMeter(exclude=model) as meter:
        out = model(x, targets=torch.roll(x, -1, 1), return_logits=False, **kw)
    lengths = observed_step_lengths(cfg, out.stats.depth, T)  # token choice: the routing it drew
    spec = ActivationSpec(B, T, precision, checkpointing, tp=tp, sequence_parallel=sequence_parallel, step_lengths=lengths,
                          document_masking=documents)
    planned = activation_bytes(cfg, spec)["total"]
    (out.loss + out.aux_loss).backward()  # the graph the meter saw is a real, complete one
    return float(meter.bytes), planned


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_the_meter_tp1(case, checkpointing, precision):
    measured, planned = _measure(case, checkpointing, precision)
    assert planned == pytest.approx(measured, rel=TOLERANCE), (case, checkpointing, precision, measured, planned)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_the_meter_with_document_masking(case, checkpointing):
    measured, planned = _measure(case, checkpointing, "bf16", documents=True)
    assert planned == pytest.approx(measured, rel=TOLERANCE), (case, checkpointing, measured, planned)


def _tp_rank(rank: int, world: int) -> None:
    bad = []
    runs = [(*c, False) for c in itertools.product(CASES, (False, True), ("bf16", "fp32"))]
    runs += [(case, ckpt, "bf16", True) for case, ckpt in itertools.product(CASES, (False, True))]  # + sequence parallel
    for case, ckpt, precision, sp in runs:
        measured, planned = _measure(case, ckpt, precision, torch.distributed.group.WORLD, sp)
        if abs(planned - measured) > TOLERANCE * measured:
            bad.append(f"{case} ckpt={ckpt} {precision} sp={sp}: measured {measured:.0f}, planned {planned:.0f}")
    assert not bad, f"rank {rank}: " + "; ".join(bad)


@pytest.mark.launch
def test_plan_matches_the_meter_tp2_and_sequence_parallel():
    run_distributed(_tp_rank, world_size=2)


def test_checkpointing_and_tp_shrink_what_they_should():
    cfg = tiny_config(vocab_size=VOCAB, **CASES["mor_expert"])
    plain = activation_bytes(cfg, ActivationSpec(4, 64, "bf16"))
    ckpt = activation_bytes(cfg, ActivationSpec(4, 64, "bf16", checkpointing=True))
    tp2 = activation_bytes(cfg, ActivationSpec(4, 64, "bf16", tp=2))
    sp2 = activation_bytes(cfg, ActivationSpec(4, 64, "bf16", tp=2, sequence_parallel=True))
    assert ckpt["total"] < plain["total"] / 3
    assert tp2["attention"] == pytest.approx(plain["attention"] / 2)
    assert tp2["mlp"] == pytest.approx(plain["mlp"] / 2)
    # Norms are replicated without sequence parallelism (TP's loss also keeps the final norm's output).
    assert tp2["norms"] == plain["norms"] + 4 * 64 * cfg.d_model * 2
    # SP splits the norms' own tensors; the projections still keep whole gathered sequences.
    assert sp2["norms"] < tp2["norms"] and sp2["total"] < tp2["total"]
    # The backward's recompute of one layer application is what a full-length one saves.
    assert 0 < recompute_bytes(cfg, ActivationSpec(4, 64, "bf16", checkpointing=True)) < plain["total"]
    # Twice the micro-batch, twice the bytes (up to the [V, D] loss buffer).
    double = activation_bytes(cfg, ActivationSpec(8, 64, "bf16"))["total"]
    assert double == pytest.approx(2 * plain["total"] - VOCAB * cfg.d_model * 4)
