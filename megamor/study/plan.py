"""The runs of a study: every variant x seed, in a stable order (the SLURM array index)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megamor.model.flops import flops_per_token
from megamor.study.budget import RunBudget, run_budget
from megamor.study.config import StudyConfig, VariantConfig
from megamor.train.config import ExperimentConfig, load_experiment


@dataclass
class RunSpec:
    index: int
    name: str  # <variant>-s<seed>
    variant: str
    seed: int
    run_dir: Path
    config: Path  # the study's base experiment
    overrides: list[str]  # everything that makes this run this run (passed to megamor.train)
    budget: RunBudget
    forward_flops_per_token: float

    @property
    def result_path(self) -> Path:
        return self.run_dir / "study_result.json"


def data_overrides(shards: Path, tokenizer: Path) -> list[str]:
    return [f"data.train=[{shards}]", f"data.valid=[{shards}]", f"data.tokenizer={tokenizer}"]


def _experiment(study: StudyConfig, v: VariantConfig, seed: int, extra: list[str]) -> tuple[list[str], ExperimentConfig]:
    # W&B: one group per study, the variant and seed as tags (a study's overrides may replace them)
    tracking = [f"wandb.group={study.name}", f"wandb.tags=[{v.name},seed{seed}]"]
    ov = [f"model_config={v.model_config}", *tracking, *study.overrides, *v.overrides, f"seed={seed}",
          f"data.seed={seed}", *extra]
    return ov, load_experiment([study.experiment], ov)


def plan_runs(study: StudyConfig, shards: Path, tokenizer: Path) -> list[RunSpec]:
    """Resolve every run's experiment config (checked now, before anything starts) and budget."""
    runs: list[RunSpec] = []
    out = study.out_path / "runs"
    for v in study.variants:
        for seed in study.seeds:
            name = f"{v.name}-s{seed}"
            run_dir = out / name
            base = [f"name={name}", f"run_dir={run_dir}", *data_overrides(shards, tokenizer),
                    "trainer.max_tokens=null", "trainer.max_steps=1"]
            ov, cfg = _experiment(study, v, seed, base)
            b = run_budget(study.budget, cfg.model, cfg.data.seq_len, cfg.batch.global_batch_size)
            ov = ov[:-1] + [f"trainer.max_steps={b.steps}"]
            load_experiment([study.experiment], ov)  # the final config must be valid too (schedule vs steps)
            runs.append(RunSpec(len(runs), name, v.name, seed, run_dir, Path(study.experiment), ov, b,
                                flops_per_token(cfg.model, cfg.data.seq_len)))
    return runs
