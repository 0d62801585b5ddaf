"""What the trainer does around a resume, in one process: metrics cut back to the resumed step,
the non-finite gradient guard."""

from __future__ import annotations

import json

import torch

from megamor.train.callbacks.metrics_file import cut_back_metrics
from megamor.train.optim import skippable


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 8)] + [{"step": 4, "val/loss": 2.0}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "train/lo')  # torn last line
    assert cut_back_metrics(p, 4) == 4
    assert [json.loads(ln)["step"] for ln in p.read_text().splitlines()] == [1, 2, 3, 4, 4]
    assert cut_back_metrics(p, 4) == 0


def test_guard_skips_a_step_with_nonfinite_gradients_without_touching_state():
    w = torch.nn.Parameter(torch.ones(3))
    opt = skippable(torch.optim.AdamW)([w], lr=0.1)
    opt.guard_nonfinite_grads = True
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step()
    assert opt.nonfinite_grads and torch.equal(w.detach(), torch.ones(3)) and not opt.state
    opt.nonfinite_grads = False
    w.grad = torch.ones(3)
    opt.step()
    assert not opt.nonfinite_grads and not torch.equal(w.detach(), torch.ones(3))
