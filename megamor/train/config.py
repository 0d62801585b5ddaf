"""The experiment config: one typed tree holding everything a training run needs.

    name, run_dir, seed
    model      ModelConfig   (from `model_config: path.yaml`, then `model:` keys on top)
    data       DataConfig
    batch      global / micro batch sizes (accumulation is derived from the world size)
    optim      AdamW hyper-parameters and implementation
    schedule   warmup-stable-decay (the paper's) or cosine
    deepspeed  ZeRO stage, precision, raw DeepSpeed keys
    trainer    steps, activation checkpointing, non-finite handling, MFU peak
    budget     or the run's length as a FLOP budget; flops.convention says how it is counted
    checkpoint every / keep-last / resume
    eval       validation every M steps
    logging    cadence; console, metrics.jsonl, TensorBoard, depth-histogram CSV
    wandb      online / offline / disabled

This module parses and validates: `load_experiment` checks values and unknown keys, a
ConfigError names the key. Checks against the launch environment, the data and the run folder
(resume compatibility, schedule change, TP/DP layout, init_from) are the trainer's preflight
step (megamor/train/preflight.py), still before any process group starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from megamor.config import ConfigError, from_node, key, merge_config_nodes, merge_sources
from megamor.data.config import NEED_TRAIN, DataConfig
from megamor.env import repo_root
from megamor.eval.tasks import UnknownTaskError, check_task_names
from megamor.model.config import STORED_DEFAULTS, ModelConfig, with_stored_defaults
from megamor.model.flex import DOC_MASK_IMPLS
from megamor.model.flops import BUDGET_COUNTS, FlopsConfig, budget_flops_per_token, budget_steps
from megamor.parallel.tensor_parallel import layout_errors
from megamor.runs.layout import CONFIG_FILE, CheckpointError, CheckpointRef
from megamor.train.callbacks.user import check_entries as check_callbacks
from megamor.train.ds_keys import check_deepspeed_keys, zero_knobs

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("wsd", "cosine", "constant")
OPTIM_IMPLS = ("auto", "torch", "torch_fused", "deepspeed_fused")
WANDB_MODES = ("online", "offline", "disabled")
_WANDB_ALIASES = {"dryrun": "offline", "run": "online"}


@dataclass
class BatchConfig:
    global_batch_size: int = 512  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank

    def validate(self, path: str) -> None:
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(key(path, name), "must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                key(path, "global_batch_size"),
                f"{self.global_batch_size} is not divisible by micro_batch_size {self.micro_batch_size}",
            )

    def accumulation_steps(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2)
    eps: float = 1e-8  # AdamW's epsilon
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    decay_embeddings: bool = False  # also apply weight decay to the embeddings
    grad_clip: float = 1.0  # global norm; 0 disables
    # auto: torch AdamW (fused kernels on CUDA, no JIT build); deepspeed_fused: DeepSpeed's
    # FusedAdam (JIT-compiled on first use unless prebuilt).
    impl: str = "auto"

    def validate(self, path: str) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(key(path, "lr"), f"must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(key(path, "betas"), f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(key(path, "eps"), "must be positive")
        if self.weight_decay < 0:
            raise ConfigError(key(path, "weight_decay"), "must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(key(path, "grad_clip"), "must be >= 0 (0 disables clipping)")
        if self.impl not in OPTIM_IMPLS:
            raise ConfigError(key(path, "impl"), f"must be one of {OPTIM_IMPLS}, got {self.impl!r}")


@dataclass
class ScheduleConfig:
    type: str = "wsd"  # wsd (warmup-stable-decay, the paper's) | cosine | constant
    warmup_steps: int | None = None  # overrides warmup_fraction
    warmup_fraction: float = 0.05  # linear warmup over this fraction of the steps
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays to min_lr_ratio * lr
    decay_steps: int | None = None  # wsd: overrides decay_fraction (e.g. an annealing phase's length)
    decay_shape: str = "linear"  # wsd decay: linear | cosine
    min_lr_ratio: float = 0.0  # the learning rate ends at min_lr_ratio * lr
    allow_change: bool = False  # resume even if max_steps/max_tokens/schedule changed (schedule rebuilt)

    def validate(self, path: str) -> None:
        if self.type not in SCHEDULES:
            raise ConfigError(key(path, "type"), f"must be one of {SCHEDULES}, got {self.type!r}")
        if self.decay_shape not in ("linear", "cosine"):
            raise ConfigError(key(path, "decay_shape"), f"must be linear or cosine, got {self.decay_shape!r}")
        for name in ("warmup_fraction", "decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(key(path, name), f"must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(key(path, "warmup_steps"), "must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 0:
            raise ConfigError(key(path, "decay_steps"), "must be >= 0")

    def warmup(self, max_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * max_steps)

    def decay(self, max_steps: int) -> int:
        if self.type != "wsd":
            return 0
        return self.decay_steps if self.decay_steps is not None else round(self.decay_fraction * max_steps)


@dataclass
class RunBudgetConfig:
    # The run's length as a FLOP budget instead of trainer.max_steps / max_tokens (give one of
    # the three): steps = round(flops / (FLOPs per token x global batch x seq_len)), FLOPs per
    # token of `model` as a study's budget counts them (megamor.model.flops.budget_steps).
    flops: float | None = None
    count: str = "forward"  # forward | training (3 x forward)

    def validate(self, path: str) -> None:
        if self.flops is not None and not self.flops > 0:
            raise ConfigError(key(path, "flops"), f"must be positive, got {self.flops}")
        if self.count not in BUDGET_COUNTS:
            raise ConfigError(key(path, "count"), f"must be one of {BUDGET_COUNTS}, got {self.count!r}")


RunFlopsConfig = FlopsConfig  # the experiment's `flops:` (the name kept for imports)


# Raw DeepSpeed keys megamor derives from its own config (megamor.train.ds_config): setting them
# in `deepspeed.config` is refused, since the merge would silently win over what megamor's own
# code (the ZeRO-3 paths, the planner, the LR schedule, the bf16 guard, universal resumes)
# assumes. Checked on the configs a user gives (load_experiment), not on the ones runs saved:
# a run started before a key joined this table still resumes and exports.
OWNED_DS_KEYS = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.* (derived)",
    "optimizer": "optim.*",
    "scheduler": "optim.* and schedule.*",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "deepspeed.precision",
    "bfloat16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
    "torch_autocast.enabled": "deepspeed.precision",
    "zero_allow_untested_optimizer": "megamor (its AdamW under ZeRO)",
    "checkpoint.load_universal": "megamor (set on a resume with another layout)",
}
PRECISION_SECTIONS = ("bf16", "bfloat16", "fp16", "torch_autocast")


def check_owned_ds_keys(config: dict[str, Any], where: str = "deepspeed.config") -> None:
    """ConfigError naming the first raw DeepSpeed key of OWNED_DS_KEYS that `config` sets."""
    for name in PRECISION_SECTIONS:  # a bare value (`bf16: false`) replaces megamor's whole section
        if name in config and not isinstance(config[name], dict):
            raise ConfigError(f"{where}.{name}", f"must be a section of keys, got {config[name]!r}; the precision "
                                                 "is deepspeed.precision")
    for raw, owner in OWNED_DS_KEYS.items():
        section, _, name = raw.rpartition(".")
        holder = config.get(section, {}) if section else config
        if isinstance(holder, dict) and name in holder:
            raise ConfigError(f"{where}.{raw}", f"is set by megamor from {owner}, not here (a second value would "
                                                "train something else than megamor plans, logs and checkpoints)")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (what is sharded over data-parallel ranks)
    precision: str = "bf16"  # fp32 | bf16 (bf16 keeps fp32 master weights in the optimizer)
    # Raw DeepSpeed config keys, merged last (e.g. {"zero_optimization": {"overlap_comm": true}}).
    config: dict[str, Any] = field(default_factory=dict)
    check_keys: bool = True  # reject keys of `config` DeepSpeed does not know (typos are silently ignored there)

    def validate(self, path: str) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(key(path, "zero_stage"), f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(key(path, "precision"), f"must be one of {PRECISIONS}, got {self.precision!r}")
        if self.check_keys:
            check_deepspeed_keys(self.config, key(path, "config"))
        zero_knobs(self.config, key(path, "config"))  # values: the planner reads these too


TP_ZERO_STAGES = (0, 1, 2)


@dataclass
class ParallelConfig:
    # Tensor-parallel size: ranks [k*N, (k+1)*N) shard every layer (keep them inside one node);
    # the data-parallel size is world / N.
    tensor: int = 1
    # Megatron-style sequence parallelism inside each TP group: norms, residual stream and router
    # inputs hold T/N tokens per rank between TP regions (megamor.parallel.sequence_parallel).
    sequence: bool = False
    # Seconds a rank may wait at one place of the loop (a step, a save, validation) while another
    # rank stopped answering or is elsewhere, before it exits 75 to be requeued
    # (megamor/parallel/watchdog.py); 0: off, only the process group's 30 min timeout.
    collective_timeout_s: float = 300.0

    def validate(self, path: str) -> None:
        if not self.collective_timeout_s >= 0 or self.collective_timeout_s == float("inf"):
            raise ConfigError(key(path, "collective_timeout_s"), f"must be seconds >= 0 (0: off), got "
                                                                 f"{self.collective_timeout_s}")
        if self.tensor < 1:
            raise ConfigError(key(path, "tensor"), f"must be >= 1, got {self.tensor}")
        if self.sequence and self.tensor == 1:
            raise ConfigError(key(path, "sequence"), "true needs parallel.tensor > 1 (got parallel.tensor=1): "
                              "sequence parallelism splits the sequence across a tensor-parallel group")


@dataclass
class ProfileConfig:
    # [a, b]: record a torch.profiler trace of optimizer steps a..b (1-based, inclusive) on every
    # rank into RUN/profile/ (megamor/observe/profiler.py); [a]: step a alone; []: off, nothing installed.
    steps: list[int] = field(default_factory=list)
    memory: bool = False  # also record allocations (and, on CUDA, an allocator snapshot)

    def validate(self, path: str) -> None:
        s = list(self.steps)
        if len(s) == 1:  # what the loader suggests for `steps=5`: that step alone
            s = self.steps = [s[0], s[0]]
        if s and (len(s) != 2 or s[0] < 1 or s[0] > s[1]):
            raise ConfigError(key(path, "steps"), f"must be [a, b] with 1 <= a <= b (optimizer steps to profile), or [a] "
                                                  f"for step a alone, got {s}")


TRAIN_ONLY = ("all", "routers")


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # optimizer steps; or give max_tokens
    max_tokens: int | None = None  # converted to steps of global_batch_size * seq_len tokens
    activation_checkpointing: bool = False  # recompute every layer application (non-reentrant)
    max_consecutive_nonfinite: int = 5  # non-finite losses skip the step; this many in a row abort
    # Automatic restarts (SLURM requeue, torchrun --max-restarts) in a row from one checkpoint
    # before the run refuses with exit 1 instead of looping (0: no limit; callbacks/restart_guard.py).
    max_restarts_without_progress: int = 3
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs' bf16 peak, or measured on CPU
    device_tflops_probe: bool = True  # on CPU without peak_tflops: time a matmul once per machine (cached)
    verbose_deepspeed: bool = False  # show DeepSpeed's start-up warnings (also MEGAMOR_DS_VERBOSE=1)
    compile: str = "auto"  # torch.compile each layer: auto (on for CUDA, off for CPU) | true | false
    # data.document_masking's attention: dense ([B, 1, T, T] mask, SDPA) | flex (FlexAttention
    # block masks, no dense mask; CPU backward falls back to dense: docs/model.md)
    doc_mask_impl: str = "dense"
    # Weights to start from at step 0 (a megamor.pt of megamor.convert or megamor.export, an
    # export folder); its network must be `model`'s (router settings, max_seq_len may differ).
    # Ignored when resuming a checkpoint.
    init_from: str | None = None
    # routers: router tuning of a model megamor.adapt wrapped; every other parameter is frozen
    # (requires_grad False, in no optimizer group), so the pretrained weights stay bit for bit.
    train_only: str = "all"  # all | routers (train the routers alone, every other parameter frozen)
    # A new training phase (mid-training, annealing): RUN or RUN/step_N (default its newest
    # complete checkpoint); weights, optimizer state and step counter come from there, the rest
    # (data mix, seq_len, schedule, batch) from this config, into a new run_dir
    # (megamor/train/phase.py). Ignored once this run_dir has checkpoints of its own.
    continue_from: str | None = None
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Callbacks added to the loop: 'module:Class' or {target: 'module:Class', kwargs: {...}}
    # (a subclass of megamor.train.callbacks.Callback; docs/architecture.md lists the hooks).
    callbacks: list[Any] = field(default_factory=list)

    def validate(self, path: str) -> None:
        self.compile = str(self.compile).lower()
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError(key(path, "compile"), f"must be auto, true or false, got {self.compile!r}")
        if self.doc_mask_impl not in DOC_MASK_IMPLS:
            raise ConfigError(key(path, "doc_mask_impl"), f"must be one of {DOC_MASK_IMPLS}, got {self.doc_mask_impl!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(key(path, "max_steps"), "must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(key(path, "max_tokens"), "must be >= 1")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(key(path, "max_consecutive_nonfinite"), "must be >= 1")
        if self.max_restarts_without_progress < 0:
            raise ConfigError(key(path, "max_restarts_without_progress"), "must be >= 0 (0: no limit)")
        if self.train_only not in TRAIN_ONLY:
            raise ConfigError(key(path, "train_only"), f"must be one of {TRAIN_ONLY}, got {self.train_only!r}")
        if self.init_from is not None and self.continue_from is not None:
            raise ConfigError(key(path, "continue_from"), f"and trainer.init_from are both set ({self.continue_from}, "
                                                          f"{self.init_from}): continue_from takes weights, optimizer "
                                                          "state and step; init_from weights only at step 0. Give one")
        # init_from's existence: checked by the preflight only when no checkpoint is resumed
        check_callbacks(list(self.callbacks), key(path, "callbacks"), imports=False)  # imports: load_experiment


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0: only at the end (and on a stop signal)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # start from the newest complete checkpoint in run_dir/checkpoints
    save_final: bool = True  # save a checkpoint when training ends
    verify: str = "hash"  # before resuming: hash (every file's size and content hash) | size (sizes only)

    def validate(self, path: str) -> None:
        if self.verify not in ("hash", "size"):
            raise ConfigError(key(path, "verify"), f"must be hash or size, got {self.verify!r}")
        if self.every_steps < 0:
            raise ConfigError(key(path, "every_steps"), "must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(key(path, "keep_last"), "must be >= 1")


@dataclass
class EvalConfig:
    every_steps: int = 500  # validation loss every M steps (0: only at the end)
    max_batches: int | None = 50  # per validation folder; None: the whole split
    micro_batch_size: int | None = None  # default batch.micro_batch_size
    causal_routing: bool = True  # expert choice: also report the loss with causal (threshold) routing
    at_end: bool = True  # also validate after the last step
    # Downstream tasks scored zero-shot at the validation cadence, logged as eval/TASK/acc (needs
    # data.tokenizer; ZeRO-3 over several DP ranks holds a whole copy of the weights per rank while
    # scoring). The scoring is evals/fewshot.py's (megamor/train/downstream.py).
    tasks: list[str] = field(default_factory=list)
    task_limit: int = 200  # the first N examples of each of eval.tasks, split over the data-parallel ranks

    def validate(self, path: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(key(path, "every_steps"), "must be >= 0")
        for i, name in enumerate(self.tasks):
            try:
                check_task_names([name], key(path, f"tasks[{i}]"))
            except UnknownTaskError as e:
                raise ConfigError(key(path, f"tasks[{i}]"), str(e).partition(": ")[2]) from None
        if self.task_limit < 1:
            raise ConfigError(key(path, "task_limit"), f"must be >= 1, got {self.task_limit}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(key(path, "max_batches"), "must be >= 1 (or null for the whole split)")


@dataclass
class LoggingConfig:
    """Where metrics go (rank 0 only) and how often.

    tensorboard: also write every scalar W&B gets, `router/depth_hist` as a histogram and the
        router health series as TensorBoard events in RUN/tensorboard/; a resumed run continues
        the curves and hides the points a killed run logged after its checkpoint (needs the
        `tensorboard` package: pip install 'megamor[tensorboard]').
    depth_hist_csv: write the depth histogram (tokens per recursion depth, summed over the steps
        since the previous rows) to this CSV (`step,depth,count,fraction`; relative: inside the
        run folder); appended a step's rows at a time, cut back to the resumed step on resume.
        `python -m megamor.eval.depth_log RUN` plots it (or extracts it from metrics.jsonl).
    depth_hist_every: the CSV's cadence in steps (default: logging.every_steps).
    """

    every_steps: int = 10  # metrics to console, metrics.jsonl and W&B every N steps
    progress_bar: bool = True  # only drawn when stderr is a terminal
    tensorboard: bool = False  # also write every W&B scalar and the depth histograms to RUN/tensorboard/ (needs megamor[tensorboard])
    depth_hist_csv: str | None = None  # depth histograms to this CSV, step,depth,count,fraction (relative: in the run folder)
    depth_hist_every: int | None = None  # the depth CSV's cadence in steps (null: logging.every_steps)

    # every cadence is `every_steps` (checkpoint, eval, logging); the old name still loads
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"log_every": "every_steps"}

    def validate(self, path: str) -> None:
        if self.every_steps < 1:
            raise ConfigError(key(path, "every_steps"), "must be >= 1")
        if self.depth_hist_every is not None and self.depth_hist_every < 1:
            raise ConfigError(key(path, "depth_hist_every"), "must be >= 1 (or null: the log cadence)")
        if self.depth_hist_csv is not None and not self.depth_hist_csv.strip():
            raise ConfigError(key(path, "depth_hist_csv"), "is empty (null: no CSV)")

    def depth_hist_due(self, step: int, max_steps: int) -> bool:
        """Is the depth CSV written after this step? (Every rank knows: the trainer checks the lock.)"""
        every = self.depth_hist_every or self.every_steps
        return self.depth_hist_csv is not None and (step % every == 0 or step == max_steps)

    def depth_hist_path(self, run_dir: Path) -> Path | None:
        return None if self.depth_hist_csv is None else run_dir / Path(self.depth_hist_csv).expanduser()


@dataclass
class WandbConfig:
    mode: str | None = None  # online | offline | disabled; None: $WANDB_MODE, else disabled
    init_timeout: float | None = None  # seconds to reach the server (None: W&B's 90); then offline
    project: str = "megamor"  # W&B project
    entity: str | None = None  # W&B team or user (None: your default)
    name: str | None = None  # default: the experiment name
    group: str | None = None  # W&B run group
    tags: list[str] = field(default_factory=list)  # W&B run tags

    def validate(self, path: str) -> None:
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ConfigError(key(path, "mode"), f"must be one of {WANDB_MODES}, got {self.mode!r}")
        env = os.environ.get("WANDB_MODE")
        if self.mode is None and env and _WANDB_ALIASES.get(env, env) not in WANDB_MODES:  # a typo logged nothing
            raise ConfigError(key(path, "mode"), f"is not set, and $WANDB_MODE={env!r} is none of {WANDB_MODES} "
                                                 "(W&B's dryrun and run too): set one of them")

        if self.init_timeout is not None and self.init_timeout <= 0:
            raise ConfigError(key(path, "init_timeout"), "must be positive (seconds)")

    def resolved_mode(self) -> str:
        """A mode set in a config or override wins; else $WANDB_MODE (W&B's aliases too); else disabled."""
        mode = self.mode or os.environ.get("WANDB_MODE") or "disabled"
        mode = _WANDB_ALIASES.get(mode, mode)
        return mode if mode in WANDB_MODES else "disabled"


@dataclass
class ExperimentConfig:
    name: str = "run"  # the run's name: runs/<name> unless run_dir is set, and the W&B run name
    run_dir: str | None = None  # default runs/<name>; checkpoints, metrics, W&B live here
    seed: int = 1234  # model initialisation (the data order has its own data.seed)
    model_config: str | None = None  # a configs/model/*.yaml; `model:` keys are applied on top
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    budget: RunBudgetConfig = field(default_factory=RunBudgetConfig)  # the length as FLOPs (instead of trainer.*)
    flops: FlopsConfig = field(default_factory=FlopsConfig)

    def validate(self, path: str = "") -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(key(path, "name"), f"must be a non-empty name without '/', got {self.name!r}")
        self._validate_length(path)
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(key(path, "data.seq_len"), f"{self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        if self.eval.tasks and not self.data.tokenizer:
            raise ConfigError(key(path, "data.tokenizer"), "is required when eval.tasks is set (the downstream tasks "
                                                           "are tokenized with it): set it to the shards' tokenizer")
        if self.eval.tasks and self.parallel.sequence:
            raise ConfigError(key(path, "eval.tasks"), "is not supported with parallel.sequence=true (task requests "
                                                       "have lengths the sequence split cannot take): evaluate offline")
        if self.parallel.sequence and self.model.router.aux_router:
            raise ConfigError(key(path, "model.router.aux_router"), "is not supported with parallel.sequence=true (the "
                              "auxiliary router would run on each rank's slice of the sequence against the whole "
                              "sequence's top-k): turn one of them off")
        tp = self.parallel.tensor
        if tp > 1:
            for k, msg in layout_errors(self.model, tp):
                raise ConfigError(key(path, k), msg)
            if self.deepspeed.zero_stage not in TP_ZERO_STAGES:
                raise ConfigError(key(path, "deepspeed.zero_stage"),
                                  f"ZeRO-{self.deepspeed.zero_stage} is not supported with parallel.tensor={tp}; "
                                  f"tensor parallelism runs with ZeRO stages {TP_ZERO_STAGES}")
            if self.parallel.sequence and self.data.seq_len % tp:
                raise ConfigError(key(path, "data.seq_len"), f"{self.data.seq_len} is not divisible by parallel.tensor={tp} "
                                  "(parallel.sequence=true splits every sequence across the tensor-parallel group)")
        steps = self.max_steps
        if self.trainer.profile.steps and self.trainer.profile.steps[1] > steps:
            raise ConfigError(key(path, "trainer.profile.steps"), f"{list(self.trainer.profile.steps)} reaches past the "
                              f"run's {steps} steps")
        router = self.model.router
        if self.trainer.train_only == "routers" and router.type == "none":
            raise ConfigError(key(path, "trainer.train_only"), "routers: the model has no router (model.router.type none)")
        for name in ("cap_warmup_step", "bal_warmup_step"):
            if getattr(router, name) > steps:
                raise ConfigError(key(path, f"model.router.{name}"), f"{getattr(router, name)} exceeds the run's "
                                  f"{steps} training steps")
        warm = self.schedule.warmup(steps)
        decay = self.schedule.decay(steps)
        if warm + decay > steps:
            raise ConfigError(key(path, "schedule.warmup_steps"), f"warmup {warm} + decay {decay} steps exceed the {steps} training steps")
        if self.trainer.compile == "true" and self.deepspeed.zero_stage == 3 and self.trainer.activation_checkpointing:
            # Dynamo traces into ZeRO-3's parameter-release hook inside the checkpointed layer and fails.
            raise ConfigError(key(path, "trainer.compile"), "true is not supported with deepspeed.zero_stage 3 and "
                              "trainer.activation_checkpointing (use auto, which compiles only where it works, or false)")

    def _validate_length(self, path: str) -> None:
        given = [(k, v) for k, v in (("trainer.max_steps", self.trainer.max_steps), ("trainer.max_tokens", self.trainer.max_tokens),
                                     ("budget.flops", self.budget.flops)) if v is not None]
        if not given:
            raise ConfigError(key(path, "trainer.max_steps"), "the run's length is not set: add trainer.max_steps=N, "
                                                              "trainer.max_tokens=N or budget.flops=F")
        if len(given) > 1:
            values = " and ".join(f"{k} ({v})" for k, v in given)
            raise ConfigError(key(path, given[0][0]), f"{values} are set: give only one, e.g. add {given[1][0]}=null")

    # -- derived ----------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        if self.trainer.max_steps is not None:
            return self.trainer.max_steps
        per_step = self.batch.global_batch_size * self.data.seq_len
        if self.budget.flops is not None:
            fpt = budget_flops_per_token(self.model, self.data.seq_len, self.budget.count, self.flops.convention)
            return budget_steps(self.budget.flops, fpt, per_step)
        return max(1, -(-int(self.trainer.max_tokens or 0) // per_step))

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def eval_micro_batch_size(self) -> int:
        return self.eval.micro_batch_size or self.batch.micro_batch_size


# -- loading ------------------------------------------------------------------------------
def resolve_path(p: str, what: str) -> Path:
    """A relative path is taken from the working directory, else from the repository root."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = repo_root() / path
    if alt.exists():
        return alt
    places = dict.fromkeys([Path.cwd().resolve(), repo_root().resolve()])  # one folder when they are the same
    raise ConfigError(what, f"file not found: {p} (looked in {' and '.join(map(str, places))})")


def merge_experiment(config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                     stored: bool = False) -> Any:
    """The untyped experiment node: YAML files, overrides, and the model file under `model:`.
    stored: the files are configs megamor saved (a run's experiment.yaml), whose missing keys
    keep the defaults they were written with (model.config.STORED_DEFAULTS)."""
    node = merge_sources(config_paths, overrides, ExperimentConfig)
    _override_wins_length(node, overrides)
    if stored and OmegaConf.is_dict(node):
        node.model = with_stored_defaults(node.get("model"))
    model_file = node.get("model_config") if OmegaConf.is_dict(node) else None
    if model_file:
        path = resolve_path(str(model_file), "model_config")
        node.model = merge_config_nodes(merge_sources([path], schema=ModelConfig), node.get("model") or {}, "model")
    return node


LENGTH_KEYS = ("trainer.max_steps", "trainer.max_tokens", "budget.flops")


def _override_wins_length(node: Any, overrides: Sequence[str]) -> None:
    """`trainer.max_steps=N` on the command line replaces a file's max_tokens or budget.flops
    (and so on): they are alternatives, so an override clears the others not overridden too."""
    given = {item.partition("=")[0].strip() for item in overrides}
    for mine in LENGTH_KEYS:
        if mine not in given or OmegaConf.select(node, mine, default=None) is None:
            continue
        for other in LENGTH_KEYS:
            if other not in given and OmegaConf.select(node, other, default=None) is not None:
                OmegaConf.update(node, other, None, merge=False)


def load_experiment(config_paths: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                    need_data: bool = True) -> ExperimentConfig:
    """Typed, validated config. Raises ConfigError naming the key. need_data=False: for a tool
    that reads no data (megamor.plan), data.train may be unset."""
    if isinstance(config_paths, (str, Path)):
        config_paths = [config_paths]
    node = merge_experiment(config_paths, overrides)
    token = NEED_TRAIN.set(need_data)
    try:
        cfg = from_node(ExperimentConfig, node)
    finally:
        NEED_TRAIN.reset(token)
    check_callbacks(list(cfg.trainer.callbacks), "trainer.callbacks")  # the run's own: they must import
    check_owned_ds_keys(cfg.deepspeed.config)  # a user's config only (OWNED_DS_KEYS)
    # Keys whose default changed that this config leaves to the default: resuming a run trained
    # with the old default keeps it (preflight.check_resumable), instead of refusing.
    model = node.get("model") if OmegaConf.is_dict(node) else None
    cfg.defaulted_model_keys = frozenset(  # type: ignore[attr-defined]  (not a field: never saved)
        k for k in STORED_DEFAULTS if OmegaConf.select(model, k, default=None) is None) if model is not None \
        else frozenset(STORED_DEFAULTS)
    return cfg


def load_tag_experiment(ref: CheckpointRef) -> ExperimentConfig:
    """The typed experiment config a checkpoint tag was trained with (its experiment.yaml)."""
    cfg_file = ref.path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{ref.path}: no {CONFIG_FILE}")
    return load_stored_experiment(cfg_file)


def load_stored_experiment(path: str | Path) -> ExperimentConfig:
    """A config megamor saved (a run folder's or tag's experiment.yaml), typed and validated."""
    return from_node(ExperimentConfig, merge_experiment([path], stored=True))


def experiment_from_dict(d: dict[str, Any]) -> ExperimentConfig:
    return from_node(ExperimentConfig, OmegaConf.create(d))


def to_container(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# -- the layout over a world size (also used once processes run: ds_config, trainer) -------
def data_parallel_size(cfg: ExperimentConfig, world_size: int, local_world_size: int | None = None) -> int:
    """world / parallel.tensor; raises naming the numbers when the layout is impossible."""
    tp = cfg.parallel.tensor
    if world_size < 1:
        raise ConfigError("batch", f"world size must be >= 1, got {world_size}")
    if world_size % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide the world size {world_size} (processes launched)")
    if local_world_size and tp > 1 and local_world_size % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide the {local_world_size} processes per node: a "
                                             "tensor-parallel group would span nodes")
    return world_size // tp


def check_world(cfg: ExperimentConfig, world_size: int) -> int:
    """The gradient-accumulation steps for this world size (data parallel = world / tensor)."""
    b = cfg.batch
    dp = data_parallel_size(cfg, world_size)
    if b.global_batch_size % (b.micro_batch_size * dp):
        raise ConfigError(
            "batch.global_batch_size",
            f"{b.global_batch_size} is not divisible by micro_batch_size {b.micro_batch_size} x "
            f"data-parallel size {dp} = {b.micro_batch_size * dp}"
            + (f" (world {world_size} / parallel.tensor {cfg.parallel.tensor})" if cfg.parallel.tensor > 1 else ""),
        )
    return b.accumulation_steps(dp)
