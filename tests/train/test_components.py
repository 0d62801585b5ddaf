"""Schedules, parameter groups, the skippable optimizer, checkpoint bookkeeping, faults."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from megamor.model import ModelConfig, MoRLM, RouterConfig
from megamor.runs.integrity import MARKER
from megamor.runs.layout import CheckpointError, tag_for
from megamor.runs.resume import ensure_universal, plan_resume
from megamor.runs.tags import list_complete, newest_complete, read_complete
from megamor.train.config import OptimConfig, ScheduleConfig
from megamor.train.faults import Faults
from megamor.train.optim import build_optimizer, param_groups
from megamor.train.schedule import LRSchedule


def tiny_mor() -> MoRLM:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16,
                      sharing="middle_cycle", num_recursions=2, router=RouterConfig(type="expert_choice", learn_alpha=True))
    return MoRLM(cfg)


# -- schedules ------------------------------------------------------------------------------
def test_wsd_is_a_trapezoid():
    s = LRSchedule.from_config(ScheduleConfig(type="wsd", warmup_fraction=0.1, decay_fraction=0.2), 1.0, 100)
    assert s.lr_at(1) == pytest.approx(0.1) and s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(50) == 1.0 and s.lr_at(80) == 1.0  # stable until the last 20 steps
    assert s.lr_at(90) == pytest.approx(0.5) and s.lr_at(100) == pytest.approx(0.0)
    lrs = [s.lr_at(i) for i in range(80, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_cosine_and_floor():
    s = LRSchedule.from_config(ScheduleConfig(type="cosine", warmup_steps=10, min_lr_ratio=0.1), 2.0, 110)
    assert s.lr_at(10) == pytest.approx(2.0)
    assert s.lr_at(60) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert s.lr_at(110) == pytest.approx(0.2)


# -- optimizer ------------------------------------------------------------------------------
def test_param_groups_exclude_norms_biases_embeddings_and_count_tied_once():
    model = tiny_mor()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "embed_tokens.weight" in no_decay  # tied with lm_head: one tensor, one group
    # 1-D parameters: norm weights and the learned expert-choice gate scales (router.learn_alpha)
    assert all("norm" in n or n.endswith("scale.alpha") for n in no_decay - {"embed_tokens.weight"})
    assert any(n.endswith("scale.alpha") for n in no_decay)
    assert any("q_proj" in n for n in decay) and any("routers" in n for n in decay)
    n_total = len({id(p) for p in model.parameters()})
    assert len(decay) + len(no_decay) == n_total
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_skipped_step_touches_neither_weights_nor_moments():
    model = tiny_mor()
    opt = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    model(x, targets=x).loss.backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.skip_next_step = True
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values()))
    assert all(int(s["step"]) == 1 for s in opt.state.values())


# -- checkpoint bookkeeping ---------------------------------------------------------------------
def fake_tag(run, step, complete=True, dp=2, zero=2, precision="fp32"):
    d = run / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        meta = {"step": step, "dp_world_size": dp, "zero_stage": zero, "precision": precision,
                "files": {"mp_rank_00_model_states.pt": 10}}
        (d / MARKER).write_text(json.dumps(meta))
    return d


def test_only_complete_intact_checkpoints_count(tmp_path):
    fake_tag(tmp_path, 5)
    fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 15, complete=False)  # killed during save
    damaged = fake_tag(tmp_path, 20)
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"x" * 3)  # truncated after the marker
    assert [c.step for c in list_complete(tmp_path)] == [5, 10]
    assert newest_complete(tmp_path).step == 10
    assert read_complete(damaged) is None


def test_resume_plan_same_layout_direct_else_universal(tmp_path):
    fake_tag(tmp_path, 10, dp=2, zero=2)
    assert plan_resume(tmp_path, 2, 2, "fp32").universal is False
    assert plan_resume(tmp_path, 1, 2, "fp32").universal is True
    assert plan_resume(tmp_path / "nothing", 1, 2, "fp32") is None


def test_zero0_bf16_cannot_reshard_and_says_why(tmp_path):
    fake_tag(tmp_path, 10, dp=2, zero=0, precision="bf16")
    plan = plan_resume(tmp_path, 1, 0, "bf16")
    assert plan.universal
    with pytest.raises(CheckpointError, match=r"cannot be resharded.*same data-parallel size"):
        ensure_universal(plan.ref)
    fake_tag(tmp_path / "b", 10, dp=2, zero=0, precision="fp32")
    assert plan_resume(tmp_path / "b", 1, 0, "fp32").universal is False  # replicated: loads directly


def test_faults_parse():
    import os

    os.environ["MEGAMOR_FAULTS"] = "sigkill_after_step=12,nan_loss_at_step=3:4,rank=1"
    try:
        f = Faults.from_env()
    finally:
        del os.environ["MEGAMOR_FAULTS"]
    assert f.sigkill_after_step == 12 and f.rank == 1
    assert [f.nan_loss(s) for s in (2, 3, 4, 5)] == [False, True, True, False]


# -- MFU peak ---------------------------------------------------------------------------------------
def test_cpu_peak_is_measured_once_and_cached(tmp_path):
    import json as _json

    from megamor.train.metrics import PEAK_CACHE_FILE, cpu_peak_key, peak_tflops

    cpu = torch.device("cpu")
    first = peak_tflops(cpu, "fp32", None, True, cache_folder=tmp_path)
    cache = _json.loads((tmp_path / PEAK_CACHE_FILE).read_text())
    assert list(cache) == [cpu_peak_key("fp32")] and cache[cpu_peak_key("fp32")]["tflops"] == first > 0
    assert all(peak_tflops(cpu, "fp32", None, True, cache_folder=tmp_path) == first for _ in range(3))
    # the figure comes from the file, not a new timing: a planted value is what every run uses
    cache[cpu_peak_key("fp32")]["tflops"] = 123.0
    (tmp_path / PEAK_CACHE_FILE).write_text(_json.dumps(cache))
    assert peak_tflops(cpu, "fp32", None, True, cache_folder=tmp_path) == 123.0
    assert peak_tflops(cpu, "fp32", 7.5, True, cache_folder=tmp_path) == 7.5  # trainer.peak_tflops wins
    (tmp_path / PEAK_CACHE_FILE).write_text("{not json")  # a damaged cache is measured again and rewritten
    assert peak_tflops(cpu, "fp32", None, True, cache_folder=tmp_path) > 0
    assert cpu_peak_key("fp32") in _json.loads((tmp_path / PEAK_CACHE_FILE).read_text())
