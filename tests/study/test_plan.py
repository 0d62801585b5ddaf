"""A study's runs: their order (the --index list), run folders and per-budget configs, for a
single-budget study (the layout it has always had) and a study with several budgets."""

from __future__ import annotations

from pathlib import Path

from megamor.study.config import load_study
from megamor.study.plan import plan_runs
from megamor.train.config import load_experiment


def _runs(path: str, overrides: list[str] | None = None, tmp: Path = Path("/nonexistent")):
    study = load_study(path, overrides)
    return study, plan_runs(study, tmp / "shards", tmp / "tok")


def test_single_budget_run_names_and_folders_are_unchanged_and_seed_major():
    study, runs = _runs("configs/studies/small_cpu.yaml", ["seeds=[1,2]"])
    names = [v.name for v in study.variants]
    assert [r.name for r in runs] == [f"{v}-s{s}" for s in (1, 2) for v in names]  # seed 1's variants, then seed 2's
    assert [r.index for r in runs] == list(range(len(runs)))
    for r in runs:
        assert r.run_dir == Path("runs/studies/small_cpu/runs") / f"{r.variant}-s{r.seed}" and r.budget_name == ""
        exp = load_experiment([r.config], r.overrides)
        assert exp.run_dir == str(r.run_dir) and exp.name == r.name and exp.wandb.tags == [r.variant, f"seed{r.seed}"]


def test_several_budgets_run_budget_by_budget_then_seed_by_seed_with_their_width():
    study, runs = _runs("configs/studies/scaling_cpu.yaml")
    order = [(r.budget_name, r.seed, r.variant) for r in runs]
    expected = []
    for b in study.budgets:  # independent of plan_runs: the config's own lists
        subset = b.variants or [v.name for v in study.variants]
        expected += [(b.name, s, v) for s in study.seeds for v in [x.name for x in study.variants] if v in subset]
    assert order == expected and len(set(order)) == len(order)
    assert {b for b, _, _ in order} == {"1x", "3x", "9x"} and "mor_expert_3_soft" not in {v for b, _, v in order if b != "3x"}
    width = {"1x": (192, 512), "3x": (256, 688), "9x": (320, 864)}
    flops = {"1x": 8.0e12, "3x": 2.4e13, "9x": 7.2e13}
    for r in runs:
        assert r.run_dir == Path("runs/studies/scaling_cpu/runs") / r.budget_name / f"{r.variant}-s{r.seed}"
        assert r.name == f"{r.variant}@{r.budget_name}-s{r.seed}"
        exp = load_experiment([r.config], r.overrides)
        assert (exp.model.d_model, exp.model.d_ff) == width[r.budget_name], r.name
        assert exp.wandb.tags == [r.variant, f"seed{r.seed}", r.budget_name]
        per_step = exp.batch.global_batch_size * exp.data.seq_len
        assert exp.max_steps == r.budget.steps == max(1, round(flops[r.budget_name] / r.forward_flops_per_token / per_step))
        if r.variant == "mor_expert_3_alpha05":
            assert exp.model.router.alpha == 0.5
        if r.variant == "mor_expert_3_soft":
            assert exp.model.router.gate_straight_through is False
    # a bigger budget buys a wider model and more tokens for every variant
    by = {(r.budget_name, r.variant, r.seed): r for r in runs}
    for v in ("vanilla", "mor_expert_3"):
        assert by[("1x", v, 1)].budget.tokens < by[("3x", v, 1)].budget.tokens < by[("9x", v, 1)].budget.tokens
