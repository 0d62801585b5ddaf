"""`trainer.continue_from`: a new training phase (mid-training, annealing, a longer context).

A phase is a new run folder that starts from another run's checkpoint with its weights, its
optimizer state (Adam moments, per-parameter step counts) and its step counter, and trains on
with this config's data mix, sequence length, schedule and batch size. The learning-rate
schedule stays a pure function of the (continued) global step, so a WSD decay phase is
`schedule.type=wsd schedule.decay_steps=D trainer.max_steps=N+D` after a stable phase of N steps.

What the phase changed is written to RUN/phases.json: the source run, tag and checkpoint hash,
and every config key that differs from the source checkpoint's experiment.yaml (old and new
value), after the source run's own history (a phase of a phase lists both).

The data: when the source's loader state fits this config (same mix, seq_len and data.seed)
the sample order continues where the source stopped; otherwise the new mix starts at its
sample 0, a pure function of (data.seed, data), and phases.json says why.

Nothing is written to the source run folder: the checkpoint is read in place, and a universal
conversion (another data-parallel size or ZeRO stage, ZeRO 1-3 on both sides) goes into this
run folder. Once the phase has saved checkpoints of its own it resumes from them like any run
(the preflight refuses another continue_from then), so a killed phase resumes exactly.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megamor.config import ConfigError
from megamor.data.errors import DataError, DataStateError
from megamor.data.manifest import load_manifest
from megamor.model.config import flat_model_config
from megamor.parallel import dist as pdist
from megamor.runs import integrity
from megamor.runs.layout import (
    CONFIG_FILE,
    MARKER,
    TRAINER_STATE,
    CheckpointError,
    CheckpointRef,
    checkpoints_dir,
    step_of,
    tag_for,
)
from megamor.runs.resume import ResumePlan, convert_on_rank0, load_engine_state, plan_for
from megamor.runs.safe_load import load as safe_load
from megamor.runs.save import set_rng_state
from megamor.runs.tags import newest_complete, tags_line
from megamor.train.config import ExperimentConfig, load_stored_experiment, to_container
from megamor.train.init_from import NOT_COMPARED, ROUTER_FORM
from megamor.utils.atomic import write_json

KEY = "trainer.continue_from"
PHASES_FILE = "phases.json"  # RUN/phases.json: the phase history
PHASE_UNIVERSAL = "phase_source"  # RUN/phase_source/<tag>: the source tag converted to a universal checkpoint
NOT_CHANGES = ("name", "run_dir", KEY)  # differ in every phase: not listed as changes


@dataclass(frozen=True)
class PhaseSource:
    run_dir: Path
    ref: CheckpointRef
    config: ExperimentConfig  # what the source checkpoint was trained with (its experiment.yaml)

    @property
    def checkpoint_hash(self) -> str:
        """xxh3-128 of the tag's COMPLETE marker, which lists every file's content hash."""
        return integrity.hash_file(self.ref.path / MARKER)


def resolve_source(spec: str, verify: str = "size") -> PhaseSource:
    """RUN, RUN/step_N, RUN/checkpoints/step_N (N padded or not) -> the complete, intact tag.
    A missing run or step is one ConfigError naming the key."""
    p = Path(spec).expanduser()
    step = step_of(p.name)
    if step is not None:  # RUN/step_N or RUN/checkpoints/step_N
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        tag_dir = checkpoints_dir(run) / tag_for(step)
    else:
        run, tag_dir = p, None
    if not run.is_dir():
        raise ConfigError(KEY, f"{spec}: run folder {run} not found")
    if tag_dir is None:
        ref = newest_complete(run)
        if ref is None:
            raise ConfigError(KEY, f"{spec}: {checkpoints_dir(run)} holds no complete checkpoint")
        tag_dir = ref.path
    if not tag_dir.is_dir():
        raise ConfigError(KEY, f"{spec}: no checkpoint {tag_dir.name} in {checkpoints_dir(run)} ({tags_line(run)})")
    meta, why = integrity.check_tag(tag_dir, verify)
    if meta is None:
        raise ConfigError(KEY, f"{spec}: {tag_dir} is not a usable checkpoint: {why}")
    if not (tag_dir / CONFIG_FILE).is_file() or not (tag_dir / TRAINER_STATE).is_file():
        raise ConfigError(KEY, f"{spec}: {tag_dir} has no {CONFIG_FILE} / {TRAINER_STATE} (not a megamor.train checkpoint)")
    return PhaseSource(run, CheckpointRef(tag_dir, step_of(tag_dir.name) or 0, meta),
                       load_stored_experiment(tag_dir / CONFIG_FILE))


def model_differences(then: ExperimentConfig, now: ExperimentConfig) -> list[str]:
    """Model keys that shape the weights or the optimizer state and differ (max_seq_len may
    grow: RoPE is computed per position; router loss settings may change, not its form)."""
    a, b = flat_model_config(then.model), flat_model_config(now.model)
    form = tuple(f"model.router.{k}" for k in ROUTER_FORM)
    keys = [k for k in b if k not in NOT_COMPARED and (not k.startswith("model.router.") or k in form)]
    return [f"{k}: {a.get(k)!r} in the source, {b[k]!r} in this run" for k in keys if a.get(k) != b[k]]


def config_changes(then: ExperimentConfig, now: ExperimentConfig) -> list[dict[str, Any]]:
    """Every config key (dotted) whose value differs from the source's: {key, old, new}."""
    def flat(d: Any, path: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{path}.{k}" if path else str(k)))
            return out
        return {path: d}

    a, b = flat(to_container(then)), flat(to_container(now))
    return [{"key": k, "old": a.get(k), "new": b.get(k)} for k in sorted(set(a) | set(b))
            if k not in NOT_CHANGES and a.get(k) != b.get(k)]


def check_continue_from(cfg: ExperimentConfig, src: PhaseSource | None = None) -> PhaseSource:
    """Preflight (every rank, before any process group): the source exists, holds this model
    and tokenizer, and leaves steps to train; each failure one ConfigError."""
    assert cfg.trainer.continue_from
    src = src or resolve_source(cfg.trainer.continue_from)
    where = str(src.ref.path)
    if src.run_dir.resolve() == cfg.run_path.resolve():
        raise ConfigError(KEY, f"{cfg.trainer.continue_from} is this run's own folder: a new phase needs a new run_dir "
                               "(to extend this run, resume it with schedule.allow_change=true)")
    diff = model_differences(src.config, cfg)
    if diff:
        raise ConfigError(KEY, f"{where} holds a different model: {'; '.join(diff)}")
    if src.config.parallel.tensor != cfg.parallel.tensor:
        raise ConfigError(KEY, f"{where} was saved with parallel.tensor={src.config.parallel.tensor}, this run has "
                               f"{cfg.parallel.tensor}: a phase keeps the tensor-parallel size (export the source and "
                               "use trainer.init_from to change it, weights only)")
    check_same_param_groups(cfg, src.config, where, "a phase keeps the trained parameters and their groups "
                                                    "(use trainer.init_from to start from weights only)")
    for length, value in (("trainer.max_tokens", cfg.trainer.max_tokens), ("budget.flops", cfg.budget.flops)):
        if value is not None:  # they count from step 0, not from the source's step
            raise ConfigError(length, f"cannot be used with {KEY}: the step counter continues from the source's step "
                                      f"{src.ref.step}; give trainer.max_steps (the total)")
    if cfg.max_steps <= src.ref.step:
        raise ConfigError("trainer.max_steps", f"{cfg.max_steps} is not past the source checkpoint's step "
                                               f"{src.ref.step} ({where}): nothing to train")
    state = safe_load(src.ref.path / TRAINER_STATE, map_location="cpu")
    try:
        data_hash = load_manifest(cfg.data.train[0])["tokenizer"]["hash"]
    except (DataError, KeyError):
        data_hash = None  # check_launch has already named a broken shard folder
    if state.get("tokenizer_hash") and data_hash and state["tokenizer_hash"] != data_hash:
        raise ConfigError(KEY, f"{where} was trained with another tokenizer (hash {state['tokenizer_hash'][:12]}) than "
                               f"data.train's (hash {data_hash[:12]})")
    return src


def check_same_param_groups(cfg: ExperimentConfig, saved: ExperimentConfig, where: str, hint: str) -> None:
    """The keys that decide the optimizer's parameter groups (megamor.train.optim.param_groups)
    match the checkpoint's: DeepSpeed cannot load its optimizer state into other groups (it fails
    with a parameter-alignment traceback, minutes in)."""
    for name, now, then in (("trainer.train_only", cfg.trainer.train_only, saved.trainer.train_only),
                            ("optim.decay_embeddings", cfg.optim.decay_embeddings, saved.optim.decay_embeddings)):
        if now != then:
            raise ConfigError(name, f"is {now!r} but {where} was trained with {then!r}: {hint}")


# -- in the trainer ---------------------------------------------------------------------------
@dataclass
class Phase:
    source: PhaseSource
    plan: ResumePlan

    @property
    def universal(self) -> bool:
        return self.plan.universal


def plan_phase(cfg: ExperimentConfig, run_dir: Path, dp: int, should_stop: Callable[[], bool] | None = None) -> Phase:
    """Every rank, before the engine exists: the source tag and how to load it (directly, or
    converted to a universal checkpoint by rank 0 into RUN/phase_source/)."""
    try:
        src = resolve_source(str(cfg.trainer.continue_from), cfg.checkpoint.verify)
    except ConfigError as e:  # preflight passed: the source changed since (a tag pruned, a file damaged)
        raise CheckpointError(str(e)) from None
    ds = cfg.deepspeed
    plan = plan_for(src.ref, dp, ds.zero_stage, ds.precision)
    if plan.universal:
        out_root = run_dir / PHASE_UNIVERSAL
        if pdist.rank() == 0:
            print(f"megamor: phase source {src.ref.path} (DP {src.ref.meta.get('dp_world_size')}, ZeRO-"
                  f"{src.ref.meta.get('zero_stage')}) loads at DP {dp}, ZeRO-{ds.zero_stage}: converting to a universal "
                  f"checkpoint in {out_root}", flush=True)
        convert_on_rank0(src.ref, out_root, should_stop)  # ConversionStopped on a stop signal: the trainer exits 75
        plan = ResumePlan(src.ref, out_root, universal=True)
    return Phase(src, plan)


def start_phase(t: Any, phase: Phase) -> None:
    """Load the source's engine state (weights, optimizer) and progress into `t`, a Trainer
    whose engine and loader are set up (not imported: the trainer imports this module), start
    the data, and (rank 0) write RUN/phases.json."""
    src, plan = phase.source, phase.plan
    state = load_engine_state(t.engine, plan, t.group_hparams, src.ref.path)
    t.step = t.last_saved_step = int(state["step"])  # nothing of this phase to save before its first step
    t.tokens = int(state["tokens"])
    t.skipped_steps = int(state.get("skipped_steps", 0))
    t.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
    t.flops_total = float(state.get("flops_total", 0.0))
    t.wandb_id = None  # a new run folder: a new W&B run
    try:
        t.loader.load_state_dict(state["data"])
        data = "continued: the source's data order goes on"
    except DataStateError as e:  # a new mix, seq_len or data.seed: the new order from its start
        data = f"fresh: sample 0 of this config's data ({e})"
    rng = state.get("rng") or []
    if len(rng) == t.world:
        set_rng_state(rng[t.rank])
    else:
        torch.manual_seed(t.cfg.seed + 1000003 * t.step + t.rank)
    if t.is_main:
        changes = config_changes(src.config, t.cfg)
        write_phase_history(t.run_dir, src, changes, data, t.tokens)
        shown = ", ".join(f"{c['key']} {c['old']!r} -> {c['new']!r}" for c in changes) or "nothing"
        print(f"megamor: new phase from {src.ref.path} at step {t.step}; changed: {shown}; data {data.split(':')[0]}",
              file=sys.stderr, flush=True)
    pdist.barrier()


def phase_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run folder's phases, oldest first ([] for a run that is no phase)."""
    path = Path(run_dir) / PHASES_FILE
    if not path.is_file():
        return []
    try:
        phases = json.loads(path.read_text()).get("phases", [])
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable phase history ({e})") from None
    return list(phases)


def write_phase_history(run_dir: Path, src: PhaseSource, changes: list[dict[str, Any]], data: str,
                        tokens: int) -> None:
    """RUN/phases.json: the source run's history, then this phase. Written whenever the phase
    starts from its source (again after a kill before its first checkpoint: the same entry)."""
    entry = {
        "run_dir": str(run_dir.resolve()),
        "source_run": str(src.run_dir.resolve()),
        "source_tag": src.ref.tag,
        "source_step": src.ref.step,
        "source_checkpoint_hash": f"{integrity.HASH_NAME}:{src.checkpoint_hash}",
        "source_tokens": tokens,
        "data": data,
        "changes": changes,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": os.uname().nodename,
    }
    write_json(run_dir / PHASES_FILE, {"phases": [*phase_history(src.run_dir), entry]})


