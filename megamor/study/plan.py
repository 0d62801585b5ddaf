"""The runs of a study: every budget x seed x variant, in a stable order (the SLURM array
index): budget by budget (as listed), and within a budget seed-major (every variant of the
first seed, then the next seed), so a study stopped part-way has complete paired seeds at its
first budget first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megamor.model.flops import flops_per_token
from megamor.study.budget import RunBudget, run_budget
from megamor.study.config import StudyBudgetConfig, StudyConfig, VariantConfig
from megamor.train.config import ExperimentConfig, load_experiment

PROVISIONAL_STEPS = 10**9  # the first resolve's length: longer than any fixed warmup


@dataclass
class RunSpec:
    index: int
    name: str  # <variant>-s<seed>; <variant>@<budget>-s<seed> in a study with several budgets
    variant: str
    seed: int
    run_dir: Path
    config: Path  # the run's base experiment (the variant's, else the study's)
    overrides: list[str]  # everything that makes this run this run (passed to megamor.train)
    budget: RunBudget  # its FLOPs in the study's convention (flops.convention)
    forward_flops_per_token: float  # exact convention (what the hardware runs), whatever the study's
    budget_name: str = ""  # "" in a single-budget study
    kept_path: Path = Path()  # the copy of its result kept beside the report (megamor.study.archive)

    @property
    def result_path(self) -> Path:
        return self.run_dir / "study_result.json"


def data_overrides(shards: Path, tokenizer: Path) -> list[str]:
    return [f"data.train=[{shards}]", f"data.valid=[{shards}]", f"data.tokenizer={tokenizer}"]


def _experiment(study: StudyConfig, budget: StudyBudgetConfig, v: VariantConfig, seed: int,
                extra: list[str]) -> tuple[list[str], ExperimentConfig]:
    # W&B: one group per study, the variant, seed (and budget) as tags (a study's overrides may
    # replace them). Order: the study's, the budget's (its width), the variant's overrides.
    tags = [v.name, f"seed{seed}", *([budget.name] if budget.name else [])]
    tracking = [f"wandb.group={study.name}", f"wandb.tags=[{','.join(tags)}]"]
    model = [f"model_config={v.model_config}"] if v.model_config else []  # else the variant experiment's own
    ov = [*model, *tracking, *study.overrides, *budget.overrides, *v.overrides, f"seed={seed}", f"data.seed={seed}", *extra]
    return ov, load_experiment([experiment_path(study, v)], ov)


def experiment_path(study: StudyConfig, v: VariantConfig) -> str:
    return v.experiment or study.experiment


def run_name(variant: str, seed: int, budget: str = "") -> str:
    return f"{variant}@{budget}-s{seed}" if budget else f"{variant}-s{seed}"


def kept_result_path(report: Path, variant: str, seed: int, budget: str = "") -> Path:
    """REPORT/run_results/[<budget>/]<variant>-s<seed>.json (committed with the report)."""
    leaf = f"{variant}-s{seed}.json"
    return report / "run_results" / budget / leaf if budget else report / "run_results" / leaf


def run_dir(out: Path, variant: str, seed: int, budget: str = "") -> Path:
    """OUT/runs/<variant>-s<seed> (one budget: the layout studies have always had), else
    OUT/runs/<budget>/<variant>-s<seed>."""
    leaf = f"{variant}-s{seed}"
    return out / "runs" / budget / leaf if budget else out / "runs" / leaf


def plan_runs(study: StudyConfig, shards: Path, tokenizer: Path) -> list[RunSpec]:
    """Resolve every run's experiment config (checked now, before anything starts) and budget."""
    runs: list[RunSpec] = []
    for budget in study.run_budgets():
        for seed in study.seeds:
            for v in study.budget_variants(budget):
                name = run_name(v.name, seed, budget.name)
                folder = run_dir(study.out_path, v.name, seed, budget.name)
                # a provisional length long enough for any fixed warmup (the experiment's
                # schedule.warmup_steps); the budget's steps replace it and are checked below
                base = [f"name={name}", f"run_dir={folder}", *data_overrides(shards, tokenizer),
                        "trainer.max_tokens=null", f"trainer.max_steps={PROVISIONAL_STEPS}"]
                ov, cfg = _experiment(study, budget, v, seed, base)
                b = run_budget(budget, cfg.model, cfg.data.seq_len, cfg.batch.global_batch_size, study.flops.convention)
                ov = ov[:-1] + [f"trainer.max_steps={b.steps}"]
                load_experiment([experiment_path(study, v)], ov)  # the final config must be valid too (schedule vs steps)
                runs.append(RunSpec(len(runs), name, v.name, seed, folder, Path(experiment_path(study, v)), ov, b,
                                    flops_per_token(cfg.model, cfg.data.seq_len), budget.name,
                                    kept_result_path(study.report_path, v.name, seed, budget.name)))
    return runs
