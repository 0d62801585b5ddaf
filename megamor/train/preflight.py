"""Preflight: every check of a launch that can fail before a process group starts.

`python -m megamor.train` runs `preflight(cfg, world_size)` once, right after the config is
parsed and validated (train/config.py) and before any process group or engine exists. A
failure is a ConfigError: one line naming the key, exit 2.

    launch      the TP x DP layout fits the world (and TP groups fit in a node), the batch
                divides over it, data paths and the tokenizer's vocabulary, run_dir is
                writable, W&B credentials for online mode, the tensorboard package when
                logging.tensorboard is on, eval.tasks' dataset files
    run folder  (checkpoint.resume) the checkpoint that would be resumed holds the configured
                model, the same learning-rate schedule (or schedule.allow_change), the same
                TP x DP layout for a tensor-parallel tag; trainer.init_from loads and holds
                the configured model; trainer.continue_from names a complete checkpoint of
                another run with the same model and tokenizer (megamor/train/phase.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from megamor.config import ConfigError
from megamor.eval.tasks import get_task
from megamor.model.config import STORED_DEFAULTS, flat_model_config
from megamor.parallel.env import peek_local_world_size, resolve_launch_env
from megamor.runs.layout import CONFIG_FILE, TRAINER_STATE, CheckpointRef
from megamor.runs.resume import universal_refusal
from megamor.runs.tags import newest_complete
from megamor.train.config import (
    ExperimentConfig,
    check_world,
    data_parallel_size,
    load_stored_experiment,
)
from megamor.train.init_from import check_init_from
from megamor.train.phase import check_continue_from, check_same_param_groups, resolve_source
from megamor.train.schedule_change import check_schedule_change, phase_lr_note
from megamor.train.tensorboard_sink import check_available as check_tensorboard
from megamor.train.wandb_setup import check_credentials


def preflight(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """All checks before launch. Returns the shards' tokenizer entry (hash, vocab_size, ...)."""
    tokenizer = check_launch(cfg, world_size)
    check_run_folder(cfg, world_size)
    return tokenizer


def check_launch(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The launch environment and the files the config names (not the run folder's contents)."""
    data_parallel_size(cfg, world_size, peek_local_world_size())
    check_world(cfg, world_size)
    tokenizer = cfg.data.check_paths("data")
    vocab = int(tokenizer.get("vocab_size", 0))
    if vocab > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary {vocab}")
    run = cfg.run_path
    probe = run if run.exists() else next((p for p in run.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError("run_dir", f"{run}: {probe} is not writable")
    check_credentials(cfg.wandb.resolved_mode())
    check_tensorboard(cfg.logging.tensorboard)
    check_task_files(cfg)
    return tokenizer


def check_task_files(cfg: ExperimentConfig) -> None:
    """Every task of eval.tasks has its dataset file (read at the first evaluation, hours in)."""
    for i, name in enumerate(cfg.eval.tasks):
        path = get_task(name).eval_file()
        if not path.is_file():
            raise ConfigError(f"eval.tasks[{i}]", f"{name}: dataset file {path} not found (tasks are read from "
                                                  "$MEGAMOR_DATA_DIR)")


def check_run_folder(cfg: ExperimentConfig, world_size: int) -> None:
    """What the run folder (and trainer.init_from) must agree with before resuming or starting."""
    ref = newest_complete(cfg.run_path) if cfg.checkpoint.resume else None
    if ref is not None:
        check_resumable(cfg, ref)
        check_resume_layout(cfg, ref, world_size)
        check_loadable(cfg, ref, world_size)
        check_resume_data(cfg, ref, world_size)
    elif cfg.trainer.continue_from:  # a new phase (its own checkpoints, once saved, win: resumed above)
        src = resolve_source(cfg.trainer.continue_from)
        keep_trained_defaults(cfg, src.config, str(src.ref.path))
        check_continue_from(cfg, src)
        check_resume_layout(cfg, src.ref, world_size)  # TP shards load only at their own TP x DP layout
        check_loadable(cfg, src.ref, world_size)
        if resolve_launch_env(dict(os.environ)).rank == 0:
            print(phase_lr_note(cfg, src.config, src.ref.step, str(src.ref.path)), file=sys.stderr, flush=True)
    if cfg.trainer.init_from and ref is None:  # a resume takes its own checkpoint's weights instead
        if not Path(cfg.trainer.init_from).exists():
            raise ConfigError("trainer.init_from", f"{cfg.trainer.init_from} not found")
        check_init_from(cfg.trainer.init_from, cfg.model)


def check_loadable(cfg: ExperimentConfig, ref: CheckpointRef, world_size: int) -> None:
    """The tag loads at this launch's layout (megamor.runs.resume.universal_refusal)."""
    ds = cfg.deepspeed
    why = universal_refusal(ref, world_size // cfg.parallel.tensor, ds.zero_stage, ds.precision)
    if why:
        raise ConfigError("deepspeed.zero_stage", why)


def check_same_phase(cfg: ExperimentConfig, saved_cfg: ExperimentConfig, ref: CheckpointRef) -> None:
    """A run folder with checkpoints of its own resumes them: a trainer.continue_from other than
    the one it was started with would be ignored while config.yaml recorded it (another source)."""
    now, then = cfg.trainer.continue_from, saved_cfg.trainer.continue_from
    if now is None or (then is not None and Path(now).resolve() == Path(then).resolve()):
        return
    started = f"started from {then}" if then else "not a phase"
    raise ConfigError("trainer.continue_from", f"is {now} but {cfg.run_path} already holds checkpoints of its own "
                                               f"({started}; newest {ref.path}), which a rerun resumes: use a new run_dir "
                                               f"for a phase from {now}, or drop trainer.continue_from to resume")


def check_resume_layout(cfg: ExperimentConfig, ref: CheckpointRef, world_size: int) -> None:
    """Tensor-parallel checkpoints resume only at the TP x DP layout they were saved with: their
    per-TP-rank files hold other slices of every matrix than another TP size would need (export
    merges them into one model; `trainer.init_from` starts a new run from that at another TP)."""
    tp_then, tp_now = int(ref.meta.get("tensor_parallel", 1)), cfg.parallel.tensor
    dp_then, dp_now = ref.meta.get("dp_world_size"), world_size // tp_now
    if tp_then != tp_now:
        raise ConfigError("parallel.tensor", f"is {tp_now} but the checkpoint to resume ({ref.path}) was saved with "
                                             f"parallel.tensor={tp_then}; resume with parallel.tensor={tp_then}, or start a "
                                             f"new run_dir with trainer.init_from={cfg.run_path} (weights only)")
    if tp_now > 1 and dp_then is not None and dp_then != dp_now:
        raise ConfigError("parallel.tensor", f"{ref.path} was saved with tensor {tp_then} x data {dp_then}; this launch "
                                             f"is tensor {tp_now} x data {dp_now}: a tensor-parallel run resumes only "
                                             f"with the same layout (launch {tp_then * dp_then} processes)")


def keep_trained_defaults(cfg: ExperimentConfig, saved_cfg: ExperimentConfig, where: str) -> None:
    """A key whose default changed (model.config.STORED_DEFAULTS) that this config does not set
    takes the value the run was trained with: an old run resumes as it trained."""
    for k in getattr(cfg, "defaulted_model_keys", ()):
        *parents, leaf = k.split(".")
        now, then = cfg.model, saved_cfg.model
        for name in parents:
            now, then = getattr(now, name), getattr(then, name)
        if getattr(now, leaf) != getattr(then, leaf):
            setattr(now, leaf, getattr(then, leaf))
            if resolve_launch_env(dict(os.environ)).rank == 0:
                print(f"megamor.train: note: model.{k} is {str(getattr(then, leaf)).lower()} as the checkpoint to resume "
                      f"({where}) was trained (its default changed since; set it to choose)", file=sys.stderr, flush=True)


def check_resumable(cfg: ExperimentConfig, ref: CheckpointRef) -> None:
    """The checkpoint this run would resume holds the configured model and schedule."""
    if not (ref.path / CONFIG_FILE).is_file():
        return
    saved_cfg = load_stored_experiment(ref.path / CONFIG_FILE)
    keep_trained_defaults(cfg, saved_cfg, str(ref.path))
    now, then = flat_model_config(cfg.model), flat_model_config(saved_cfg.model)
    for k in now:
        if now[k] != then.get(k):
            changed = " (its default changed since that run: set it explicitly)" if k.removeprefix("model.") in STORED_DEFAULTS else ""
            raise ConfigError(k, f"is {now[k]!r} but the checkpoint to resume ({ref.path}) was trained with "
                                 f"{then.get(k)!r}{changed}; use another run_dir, or checkpoint.resume=false to start over")
    for name in ("seq_len", "seed"):  # the data loader's state refuses these too, but only after start-up
        now_v, then_v = getattr(cfg.data, name), getattr(saved_cfg.data, name)
        if now_v != then_v:
            raise ConfigError(f"data.{name}", f"is {now_v} but the checkpoint to resume ({ref.path}) was trained with "
                                              f"{then_v}: the sample order would change; use another run_dir, or "
                                              "checkpoint.resume=false to start over")
    check_same_param_groups(cfg, saved_cfg, f"the checkpoint to resume ({ref.path})",
                            "use another run_dir, or start a new one from it (trainer.continue_from keeps them too; "
                            "trainer.init_from takes weights only)")
    check_same_phase(cfg, saved_cfg, ref)
    note = check_schedule_change(cfg, saved_cfg, ref.step, str(ref.path))
    if note and resolve_launch_env(dict(os.environ)).rank == 0:
        print(note, file=sys.stderr, flush=True)


# How to change the data of a run (docs/operations.md, "Mid-training"): said wherever it is refused.
CHANGE_DATA_HINT = ("to train on with other data, start a new run folder from this checkpoint (run_dir=NEW "
                    "trainer.continue_from={ckpt}: a mid-training phase), use another run_dir, or "
                    "checkpoint.resume=false to start over")


def check_resume_data(cfg: ExperimentConfig, ref: CheckpointRef, world_size: int) -> None:
    """The checkpoint's data-loader state continues on the configured data (the same check the
    resume makes, minutes later at scale, after the engine is built: megamor.data.loader)."""
    path = ref.path / TRAINER_STATE
    if not path.is_file():
        return
    try:
        from megamor.runs.safe_load import load as safe_load

        state = safe_load(path, map_location="cpu")
        data_state = state.get("data") if isinstance(state, dict) else None
    except Exception:  # noqa: BLE001  an unreadable or refused file is the resume's to report (with its exit code)
        return
    if not isinstance(data_state, dict):
        return
    from megamor.data.loader import build_train_loader

    dp = max(1, world_size // cfg.parallel.tensor)
    loader = build_train_loader(cfg.data, cfg.batch.global_batch_size, cfg.batch.micro_batch_size, 0, dp)
    problem = loader.resume_problem(data_state)
    if problem is not None:
        key, why = problem
        raise ConfigError(key, f"the checkpoint to resume ({ref.path}) cannot continue on this data: {why}; "
                               + CHANGE_DATA_HINT.format(ckpt=ref.path))
