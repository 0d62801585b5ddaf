"""The run-folder API under its old name, for existing imports (export, demo, study, scripts).

Everything here lives in megamor.runs (the run-folder layer below train/ and eval/); new code
imports it from there. Only `experiment_of` is training's own: it types a tag's
experiment.yaml with the trainer's schema.
"""

from __future__ import annotations

from megamor.runs.consolidate import consolidated_state_dict
from megamor.runs.integrity import MARKER, QUARANTINE, check_tag, quarantine, warn
from megamor.runs.layout import (
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST,
    TAG_PREFIX,
    TRAINER_STATE,
    UNIVERSAL,
    CheckpointError,
    CheckpointRef,
    NoValidCheckpointError,
    checkpoints_dir,
    step_of,
    tag_dirs,
    tag_for,
)
from megamor.runs.load import load_model_from_run, saved_model_config
from megamor.runs.resume import (
    ResumePlan,
    ensure_universal,
    find_resumable,
    plan_for,
    plan_resume,
    restore_optimizer_hparams,
    set_aside_for_restart,
)
from megamor.runs.safe_load import UnsafeCheckpointError
from megamor.runs.save import UNIVERSAL_INFO, CheckpointManager, rng_state, set_rng_state
from megamor.runs.save_errors import CheckpointSaveError
from megamor.runs.tags import list_complete, newest_complete, read_complete, resolve_tag
from megamor.train.config import ExperimentConfig, load_experiment

__all__ = [
    "CHECKPOINTS", "CONFIG_FILE", "LATEST", "MARKER", "QUARANTINE", "TAG_PREFIX", "TRAINER_STATE", "UNIVERSAL",
    "UNIVERSAL_INFO", "CheckpointError", "CheckpointManager", "CheckpointRef", "CheckpointSaveError",
    "NoValidCheckpointError", "ResumePlan", "UnsafeCheckpointError", "check_tag", "checkpoints_dir",
    "consolidated_state_dict", "ensure_universal", "experiment_of", "find_resumable", "list_complete",
    "load_model_from_run", "newest_complete", "plan_for", "plan_resume", "quarantine", "read_complete",
    "resolve_tag", "restore_optimizer_hparams", "rng_state", "saved_model_config", "set_aside_for_restart",
    "set_rng_state", "step_of", "tag_dirs", "tag_for", "warn",
]


def experiment_of(ref: CheckpointRef) -> ExperimentConfig:
    """The typed experiment config a tag was trained with."""
    cfg_file = ref.path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{ref.path}: no {CONFIG_FILE}")
    return load_experiment([cfg_file])
