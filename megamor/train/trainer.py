"""The training run on a DeepSpeed engine: set-up, resume, the loop, checkpoints, stopping.

The pieces live beside it: one optimizer step in step.py (global-token loss, router losses,
the agreement all-reduce), validation in validation.py, what a log line says in step_log.py.
The loop never holds model code: the model is built plainly and parallelism, activation
checkpointing and compilation are applied from outside (engine.build_engine). What the loop
does beside training (timers, profiler, router-state sync, checkpoint/eval cadence, the logging
sinks, fault injection, a user's own) is a callback in callbacks/, called at named hooks.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

from megamor.data.errors import DataStateError
from megamor.data.loader import build_train_loader
from megamor.data.tokenizer import TokenizerMismatchError, check_same_tokenizer, copy_tokenizer, load_tokenizer
from megamor.model import MoRLM
from megamor.model.flops import recomputed_share
from megamor.observe.profiler import PROFILE_DIR
from megamor.observe.step_observer import StepObserver
from megamor.parallel import dist as pdist
from megamor.parallel.env import LaunchEnv
from megamor.parallel.watchdog import Watchdog
from megamor.runs.layout import METRICS_FILE, TRAINER_STATE, CheckpointError
from megamor.runs.resume import (
    ConversionStopped,
    ResumePlan,
    convert_on_rank0,
    find_resumable,
    load_engine_state,
    plan_for,
    set_aside_for_restart,
)
from megamor.runs.save import CheckpointManager, set_rng_state
from megamor.runs.tags import list_complete
from megamor.train.callbacks import Callback, Callbacks
from megamor.train.callbacks.activation_memory import ActivationMemory
from megamor.train.callbacks.cadence import Cadence
from megamor.train.callbacks.console import Console
from megamor.train.callbacks.depth_csv import DepthCsv
from megamor.train.callbacks.fault_injection import FaultInjection
from megamor.train.callbacks.metrics_file import MetricsFile
from megamor.train.callbacks.phase_timers import PhaseTimers
from megamor.train.callbacks.profiler import Profiler
from megamor.train.callbacks.restart_guard import RESTARTS_FILE, RestartGuard
from megamor.train.callbacks.router_state import RouterStateSync
from megamor.train.callbacks.straggler import StragglerDetection
from megamor.train.callbacks.tensorboard import TensorBoard
from megamor.train.callbacks.user import build_user_callbacks
from megamor.train.callbacks.wandb import WANDB_ID_FILE, WandB, wandb_run_id
from megamor.train.config import ExperimentConfig, check_world, to_container, to_yaml
from megamor.train.downstream import DownstreamEval
from megamor.train.engine import build_engine, plain_model
from megamor.train.faults import ENV as FAULTS_ENV
from megamor.train.faults import Faults
from megamor.train.metrics import PeakFlops, WindowStats
from megamor.train.optim import group_hparams
from megamor.train.phase import PHASES_FILE, plan_phase, start_phase
from megamor.train.preflight import CHANGE_DATA_HINT
from megamor.train.runlock import RunLock, RunLockLostError
from megamor.train.schedule import LRSchedule
from megamor.train.signals import (
    EXIT_OK,
    EXIT_PREEMPTED,
    StoppedInSetup,
    StopRequest,
    StopRequested,
    write_exit_file,
)
from megamor.train.step import TrainStep
from megamor.train.step_log import accumulate, window_metrics
from megamor.train.tensorboard_sink import TENSORBOARD_DIR
from megamor.train.validation import Validation
from megamor.utils.atomic import atomic_open

# DeepSpeed 0.19 calls collectives torch 2.13 deprecates, once per call: one line per step.
warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: ExperimentConfig, env: LaunchEnv, device: torch.device, tokenizer_info: dict[str, Any],
                 stop_request: StopRequest | None = None, run_lock: RunLock | None = None,
                 watchdog: Watchdog | None = None, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.env = env
        self.device = device
        self.rank, self.world = env.rank, env.world_size
        self.tp = cfg.parallel.tensor
        self.dp = self.world // self.tp  # data-parallel size (check_world rejects the rest)
        self.is_main = self.rank == 0
        self.gas = check_world(cfg, self.world)
        self.tokenizer_info = tokenizer_info
        self.run_dir = cfg.run_path
        self.max_steps = cfg.max_steps
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, self.max_steps)
        self.stop_request = stop_request or StopRequest()  # __main__ installs it before the process group
        self.run_lock = run_lock  # rank 0's, held by __main__: checked before every write (_check_lock)
        self.watchdog = watchdog or Watchdog(self.rank, self.world, 0.0, None)  # told where the loop is
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last,
                                      fault_hook=lambda step: self.callbacks.during_save(step))
        # Progress (restored on resume).
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.flops_total = 0.0
        self.wandb_id: str | None = None
        self.last_saved_step = -1
        self.resumed = False  # from this run folder's own checkpoint (not a new phase of another run)
        self.exit_code: int | None = None  # fit()'s, for the sinks' close (None: an error ended it)
        self.lock_lost = False  # another trainer holds the run folder: nothing more is written there
        self._metrics: dict[str, Any] = {}  # record_metric's, until the next log window
        # Built-ins first (their order is the loop's), then `callbacks` (tests) and trainer.callbacks.
        faults = [FaultInjection(Faults.from_env())] if os.environ.get(FAULTS_ENV) else []  # tests only
        # The sinks (rank 0) come last: a metrics record goes out to them in this order. The
        # console is also the print path every part of the run writes through.
        self.console = Console()
        sinks = [self.console, MetricsFile(), WandB(), TensorBoard(), DepthCsv()]
        built_in = [*faults, RestartGuard(), RouterStateSync(), PhaseTimers(), StragglerDetection(), ActivationMemory(), Profiler(),
                    Cadence(), *sinks]
        self.callbacks = Callbacks([*built_in, *(callbacks or []), *build_user_callbacks(cfg.trainer.callbacks)])
        self.callbacks.attach(self)

    # -- set-up -----------------------------------------------------------------------
    def setup(self) -> Trainer:
        cfg = self.cfg
        self.stop_request.install()  # a signal during set-up stops the run before its first step
        self.callbacks.setup_start()  # fault injection's signal at set-up
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            plan = self._plan_resume()
            phase = plan_phase(cfg, self.run_dir, self.dp, lambda: self.stop_request.requested) \
                if plan is None and cfg.trainer.continue_from else None
        except ConversionStopped as e:  # a stop signal during a universal conversion: nothing to save
            self._stopped_in_setup(str(e))
        if self.device.type == "cpu":
            # Denormal floats (tiny gradients, Adam moments early in training) run ~10x slower
            # on x86; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        init_from = cfg.trainer.init_from if plan is None else None  # up-training (megamor.convert) or fine-tuning
        built = build_engine(cfg, self.device, world=self.world, rank=self.rank, init_from=init_from,
                             load_universal=bool((plan or phase) and (plan or phase).universal))
        self.engine, self.optimizer, self.layout = built.engine, built.optimizer, built.layout
        self.n_params, self.compiled, init = built.n_params, built.compiled, built.init
        self.group_hparams = group_hparams(self.optimizer.param_groups)
        self.model: MoRLM = self.engine.module
        # The ranks of a TP group read the same batches: the loader only knows the DP grid.
        self.loader = build_train_loader(cfg.data, cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                                         self.layout.dp_rank, self.dp)
        prof = cfg.trainer.profile  # phase timers always; the profiler only over trainer.profile.steps
        self.observer = StepObserver(self.device, self.run_dir, self.rank, self.world, prof.steps, prof.memory, self.model)
        self.train_step = TrainStep(self.engine, self.optimizer, self.loader, self.layout, self.schedule,
                                    self.stop_request, self.device, self.gas, self.tp, self.dp, self.observer,
                                    callbacks=self.callbacks)
        self.validation = Validation(cfg, self.engine, self.layout, self.device, self.dp, self.rank, self.callbacks,
                                     self._stop_agreed)
        self.downstream = DownstreamEval(cfg, self.model, self.device, self.layout.dp_rank, self.dp, self.layout.dp_group,
                                         print_fn=lambda text: self.console.print(text),
                                         plain_model=lambda: plain_model(cfg, self.layout, self.device),
                                         release_params=self.engine.empty_partition_cache)
        if plan is not None:
            self._resume(plan)
        elif phase is not None:  # trainer.continue_from: a new phase of another run
            start_phase(self, phase)
        self.wandb_id = pdist.broadcast_object(wandb_run_id(self.run_dir, self.wandb_id) if self.is_main else None)
        if self.is_main:
            with atomic_open(self.run_dir / "config.yaml", "w") as f:
                f.write(to_yaml(cfg))
            self._keep_tokenizer()
        self.peak = PeakFlops.resolve(self.device, cfg.deepspeed.precision, cfg.trainer.peak_tflops,
                                      cfg.trainer.device_tflops_probe)
        self._recomputed_share = recomputed_share(cfg.model, cfg.data.seq_len) if cfg.trainer.activation_checkpointing else 0.0
        self.callbacks.setup()  # the sinks open (metrics.jsonl and the depth CSV cut back to self.step)
        self.console.print(
            f"megamor: {cfg.name} | {self.n_params.describe()} | "
            f"world {self.world}" + (f" = tensor {self.tp} x data {self.dp}" if self.tp > 1 else "")
            + (" + sequence parallel" if self.layout.sequence else "")
            + f" | ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}"
            f"{' compiled' if self.compiled else ''} | "
            f"global batch {cfg.batch.global_batch_size} = {cfg.batch.micro_batch_size} x {self.gas} accum x {self.dp} | "
            f"seq {cfg.data.seq_len} | {self.max_steps} steps | run dir {self.run_dir}"
            + (f" | resumed from step {self.step}" if plan else "")
        )
        if init is not None:
            self.console.print(f"megamor: {init.line()}")
        return self

    def record_metric(self, name: str, value: Any) -> None:
        """A metric for the current log window (from `log_window`) or the next one (from any
        other hook); rank 0's value is the one logged."""
        self._metrics[name] = value

    def _keep_tokenizer(self) -> None:
        """A copy of the tokenizer in the run folder, so evaluation and export find it."""
        src = self.cfg.data.tokenizer
        if not src:
            return
        copy_tokenizer(load_tokenizer(src), self.run_dir / "tokenizer")  # either kind, under the names loaders find

    def _run_logs(self) -> list[Path]:
        """The run folder's per-run logs a fresh start would cut back, reuse or overwrite: set
        aside with the old tags on checkpoint.resume=false (the W&B id with them: a new W&B run)."""
        logs = [self.run_dir / name for name in (METRICS_FILE, WANDB_ID_FILE, TENSORBOARD_DIR, PROFILE_DIR, PHASES_FILE,
                                                 RESTARTS_FILE, "config.yaml")]
        depth = self.cfg.logging.depth_hist_path(self.run_dir)
        return logs + ([depth] if depth is not None else [])

    def _plan_resume(self) -> ResumePlan | None:
        if not self.cfg.checkpoint.resume:
            if self.is_main:
                set_aside_for_restart(self.run_dir, self._run_logs())
            pdist.barrier()
            self.callbacks.resume_planned(0)
            return None
        ds = self.cfg.deepspeed
        ref = find_resumable(self.run_dir, self.cfg.checkpoint.verify)  # collective; quarantines failures
        self.callbacks.resume_planned(ref.step if ref is not None else 0)  # before a conversion, engine, load
        plan = plan_for(ref, self.dp, ds.zero_stage, ds.precision) if ref is not None else None
        if plan is not None and plan.universal:
            if self.is_main:
                m = plan.ref.meta
                print(f"megamor: resuming {plan.ref.path} (DP {m.get('dp_world_size')}, ZeRO-{m.get('zero_stage')}) with DP "
                      f"{self.dp}, ZeRO-{ds.zero_stage}: converting to a universal checkpoint", flush=True)
            # every rank raises the same error (exit 2 for a refused file; ConversionStopped: exit 75)
            convert_on_rank0(plan.ref, should_stop=lambda: self.stop_request.requested)
        return plan

    def _resume(self, plan: ResumePlan) -> None:
        state = load_engine_state(self.engine, plan, self.group_hparams, plan.ref.path)
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.flops_total = float(state.get("flops_total", 0.0))
        self.wandb_id = state.get("wandb_id")
        self.last_saved_step = self.step
        self.resumed = True
        try:
            check_same_tokenizer(state.get("tokenizer_hash"), self.tokenizer_info.get("hash"),
                                 f"{plan.ref.path} was trained with", "the data's tokenizer")
        except TokenizerMismatchError as e:
            raise CheckpointError(str(e)) from None
        try:  # the preflight checked the newest tag; an older one (the newest failed its hashes) lands here
            self.loader.load_state_dict(state["data"])
        except DataStateError as e:
            raise DataStateError(f"{e}; the checkpoint to resume is {plan.ref.path}; "
                                 + CHANGE_DATA_HINT.format(ckpt=plan.ref.path)) from None
        rng = state.get("rng") or []
        if len(rng) == self.world:  # one entry per global rank (same layout: check_resume_layout)
            set_rng_state(rng[self.rank])
        else:  # another DP size: per-rank streams cannot map; derive them from the seed and step
            torch.manual_seed(self.cfg.seed + 1000003 * self.step + self.rank)

    # -- validation -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        self.watchdog.at(self.step, "validation")
        with self.observer.phase("eval"):
            metrics = self.validation.run()
            metrics.update(self.downstream.run())  # eval.tasks: {} when there are none
            return metrics

    def _check_lock(self) -> None:
        """Before every write to the run folder: does rank 0 still hold the folder's lock? One small
        all-reduce, so every rank stops at the same point (RunLockLostError: exit 2, nothing more
        written)."""
        lost = None
        if self.run_lock is not None and self.is_main:
            try:
                self.run_lock.check()
            except RunLockLostError as e:
                lost = str(e)
        self.watchdog.at(self.step, "lock check")
        flag = torch.tensor([1.0 if lost else 0.0], device=self.device)
        if pdist.all_reduce_(flag).item() > 0:
            raise RunLockLostError(lost or "rank 0 lost the run folder's lock")

    def _stop_agreed(self) -> bool:
        """One small all-reduce: did any rank get a stop signal?"""
        flag = torch.tensor([1.0 if self.stop_request.requested else 0.0], device=self.device)
        return bool(pdist.all_reduce_(flag).item() > 0)

    def _stop(self, where: str = "") -> int:
        sig = self.stop_request.signum
        self.callbacks.on_stop(self.step, sig)
        self.console.print(f"stop requested (signal {sig if sig is not None else 'on another rank'}) at step "
                          f"{self.step}{where}: saving and exiting with {EXIT_PREEMPTED}")
        self.exit_code = EXIT_PREEMPTED
        if self.last_saved_step != self.step and self.step > 0:
            self.save()
        self._record_exit_status(EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    def _stopped_in_setup(self, what: str) -> NoReturn:
        """A stop agreed before the engine exists (nothing trained, nothing to save): the stop
        line, the exit status 75, then StoppedInSetup (every rank)."""
        sig = self.stop_request.signum
        self.console.print(f"stop requested (signal {sig if sig is not None else 'on another rank'}) at step "
                           f"{self.step} during set-up ({what}): nothing to save, exiting with {EXIT_PREEMPTED}")
        self._record_exit_status(EXIT_PREEMPTED)
        raise StoppedInSetup(what)

    # -- checkpointing -------------------------------------------------------------------
    def save(self) -> Path:
        self._check_lock()
        self.watchdog.at(self.step, "checkpoint save")
        with self.observer.phase("checkpoint"):
            return self._save()

    def _save(self) -> Path:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "flops_total": self.flops_total,
            "wandb_id": self.wandb_id,
            "tokenizer_hash": self.tokenizer_info.get("hash"),
            "config": to_container(self.cfg),
        }
        meta = {
            "tokens": self.tokens,
            "dp_world_size": self.dp,
            "tensor_parallel": self.tp,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "precision": self.cfg.deepspeed.precision,
            "flops": self.flops_total,
        }
        # Every save (periodic, final, a stop's) during a non-finite streak keeps the newest tag
        # from before it: keep_last never prunes the last good tag for a state the streak left.
        good_up_to = self.step - self.consecutive_nonfinite if self.consecutive_nonfinite else None
        path = self.ckpt.save(self.engine, self.step, {"megamor": state}, to_yaml(self.cfg), meta,
                              extra_files={TRAINER_STATE: state}, good_up_to=good_up_to)
        self.last_saved_step = self.step
        self.console.print(f"checkpoint: {path}")
        self.callbacks.after_save(self.step, path)
        return path

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        done = self.step >= self.max_steps
        if done:  # an evaluation a stop cut short may still be owed (Cadence.fit_start)
            self.console.print(f"already trained for {self.step} >= {self.max_steps} steps; nothing to do")
        window = WindowStats()
        exit_code = EXIT_OK
        self.watchdog.at(self.step, "start")
        self.watchdog.start()
        try:
            if self._stop_agreed():  # a signal during set-up
                return self._stop()
            self.callbacks.fit_start()
            while self.step < self.max_steps:
                self.watchdog.at(self.step + 1, "train step")
                self.callbacks.before_step(self.step + 1)
                r = self.train_step(self.step + 1)
                self.step += 1
                self.callbacks.after_step(self.step, r)
                self.tokens += r.tokens
                self.flops_total += r.flops
                accumulate(window, r)
                if r.skipped:
                    self.skipped_steps += 1
                    self.consecutive_nonfinite += 1
                    self.console.print(f"step {self.step}: {r.skip_reason}, step skipped "
                                      f"({self.consecutive_nonfinite} in a row, {self.skipped_steps} in total)")
                    if self.consecutive_nonfinite >= cfg.trainer.max_consecutive_nonfinite:
                        window = self._log_partial(window)  # the steps since the last log line are logged
                        raise NonFiniteLossError(
                            f"{self.consecutive_nonfinite} non-finite steps in a row (steps "
                            f"{self.step - self.consecutive_nonfinite + 1}-{self.step}, last: {r.skip_reason}); aborting. "
                            f"{self._newest_good_checkpoint()}: lower optim.lr, check the data, or if the weights are "
                            "damaged resume from an earlier tag (move the later ones aside).")
                else:
                    self.consecutive_nonfinite = 0
                if self.step % cfg.logging.every_steps == 0 or self.step == self.max_steps:
                    self._log(window)
                    window = WindowStats()
                self.callbacks.step_end(self.step, r)  # faults after step K, then checkpoint and eval cadence
                if r.stop:
                    window = self._log_partial(window)  # a resumed run starts after them: log them now
                    exit_code = self._stop()
                    break
            else:
                if not done:
                    self.callbacks.fit_end(self.step)
        except StopRequested:  # agreed during validation
            window = self._log_partial(window)
            exit_code = self._stop(" during validation")
        except RunLockLostError:
            self.lock_lost = True
            raise
        else:
            self.exit_code = exit_code
        finally:
            self.watchdog.stop()
            self.stop_request.uninstall()
            self.callbacks.close()
        return exit_code

    def _log_partial(self, window: WindowStats) -> WindowStats:
        """Log a window the loop leaves before its log step (a stop, an abort): the resumed run
        starts after these steps, so they are logged now or never. Every rank calls it alike."""
        if window.steps:
            self._log(window)
        return WindowStats()

    def log_eval(self) -> None:
        """Validation (and eval.tasks) now, logged at the current step."""
        metrics = self.evaluate()
        self._check_lock()
        self.callbacks.log_metrics(self.step, metrics)

    def close(self) -> None:
        """Release the DeepSpeed engine: its gradient hooks tie parameters, optimizer and
        process groups into a cycle through C++ autograd nodes that no garbage collection
        frees, so without this they live until the interpreter shuts down."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.destroy()
        for name in ("model", "optimizer", "loader", "train_step", "validation", "downstream"):
            self.__dict__.pop(name, None)

    def _newest_good_checkpoint(self) -> str:
        """The newest checkpoint saved before the current run of non-finite steps began."""
        before = self.step - self.consecutive_nonfinite
        good = [c for c in list_complete(self.run_dir) if c.step <= before] if self.is_main else []
        return f"The newest checkpoint from before these steps is {good[-1].path}" if good else \
            "No checkpoint from before these steps exists"

    def _record_exit_status(self, code: int) -> None:
        """Rank 0 writes the exit status to $MEGAMOR_EXIT_FILE before any rank may exit. Under
        `srun --kill-on-bad-exit` the first rank to exit 75 gets the others killed, so srun's own
        status can hide the stop; slurm/train.sbatch reads this file to decide on a requeue."""
        self.watchdog.at(self.step, "exit status")
        if self.is_main:
            write_exit_file(code)
        pdist.barrier()

    def _log(self, w: WindowStats) -> None:
        self._check_lock()
        self.watchdog.at(self.step, "logging")
        m, hist = window_metrics(w, lr=self.schedule.lr_at(self.step), tokens=self.tokens,
                                 skipped_steps=self.skipped_steps, flops_total=self.flops_total, device=self.device,
                                 world=self.world, peak=self.peak if self.is_main else None, warn=self.console.print,
                                 recomputed_share=self._recomputed_share)
        m.update(self._metrics)  # recorded since the last window
        self._metrics = m  # record_metric from log_window writes into this window
        try:
            self.callbacks.log_window(self.step, m)  # time/*, straggler (one all-reduce), mem/activation_bytes
        finally:
            self._metrics = {}
        self.callbacks.log_metrics(self.step, m, hist)  # the sinks
