"""The training loop on a DeepSpeed engine.

One optimizer step:
  1. fetch this rank's micro-batches (accumulation = global / (micro x DP));
  2. all-reduce the number of target tokens, so the loss is the mean over the *global* batch
     (each micro-batch's mean is rescaled by its share; the result does not depend on how the
     batch is split over ranks and micro-batches);
  3. forward + backward each micro-batch through the engine (router losses added with their
     configured weights);
  4. one all-reduce of [loss, non-finite flag, stop request, FLOPs, router statistics]: every
     rank takes the same decisions (skip a non-finite step, stop on a signal);
  5. set the scheduled learning rate, `engine.step()` (clipping, ZeRO, AdamW), update the
     token-choice loss-free bias.
Then log / checkpoint / validate at their cadences. The loop never holds model code: the
model is built plainly and activation checkpointing is switched on from here.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megamor.data.atomic import atomic_open
from megamor.data.loader import build_eval_sets, build_train_loader, iter_eval_batches
from megamor.model import MoRLM
from megamor.model.summary import ParamCounts
from megamor.parallel import dist as pdist
from megamor.parallel.ds_noise import quiet_deepspeed
from megamor.parallel.env import LaunchEnv
from megamor.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    ResumePlan,
    ensure_universal,
    find_resumable,
    plan_for,
    restore_optimizer_hparams,
    set_aside_for_restart,
    set_rng_state,
)
from megamor.train.config import ExperimentConfig, check_world, to_container, to_yaml
from megamor.train.ds_config import deepspeed_config
from megamor.train.engine import prepare_model
from megamor.train.faults import Faults, poison_gradients
from megamor.train.logger import RunLogger, wandb_run_id
from megamor.train.metrics import (
    StepTimer,
    WindowStats,
    peak_memory_bytes,
    peak_tflops,
    step_flops,
)
from megamor.train.optim import build_optimizer, group_hparams
from megamor.train.parallelize import build_layout, parallelize
from megamor.train.router_eval import RouterValidation
from megamor.train.safe_load import UnsafeCheckpointError, safe_torch_load
from megamor.train.safe_load import load as safe_load
from megamor.train.schedule import LRSchedule
from megamor.train.signals import EXIT_OK, EXIT_PREEMPTED, StopRequest, StopRequested

TRAINER_STATE = "trainer_state.pt"

# DeepSpeed 0.19 calls collectives torch 2.13 deprecates, once per call: one line per step.
warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    tokens: int
    skipped: bool
    stop: bool
    flops: float
    data_time: float
    time: float
    grad_norm: float | None
    aux: dict[str, float]
    tokens_per_step: list[float]
    depth_hist: torch.Tensor
    skip_reason: str | None = None  # non-finite loss | non-finite gradients | non-finite gradient norm


class Trainer:
    def __init__(self, cfg: ExperimentConfig, env: LaunchEnv, device: torch.device, tokenizer_info: dict[str, Any],
                 stop_request: StopRequest | None = None):
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
        self.faults = Faults.from_env()
        self.stop_request = stop_request or StopRequest()  # __main__ installs it before the process group
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last,
                                      fault_hook=lambda step: self.faults.during_save(step, self.rank))
        # Progress (restored on resume).
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.flops_total = 0.0
        self.wandb_id: str | None = None
        self.last_saved_step = -1

    # -- set-up -----------------------------------------------------------------------
    def setup(self) -> Trainer:
        cfg = self.cfg
        self.stop_request.install()  # a signal during set-up stops the run before its first step
        self.faults.at_setup(self.rank)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        plan = self._plan_resume()
        if self.device.type == "cpu":
            # Denormal floats (tiny gradients, Adam moments early in training) run ~10x slower
            # on x86; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        self.layout = build_layout(self.tp, self.world, self.rank, cfg.parallel.sequence)
        torch.manual_seed(cfg.seed)
        model = MoRLM(cfg.model)  # the full model on every rank: TP cuts its shards from it
        if cfg.trainer.init_from and plan is None:  # up-training (megamor.convert) or fine-tuning
            from megamor.train.init_from import load_init_weights

            load_init_weights(model, cfg.trainer.init_from)
        self.n_params = ParamCounts.of(model)  # before TP / ZeRO-3 split them
        parallelize(model, self.layout)  # tensor parallelism: shards cut from the full model
        self.compiled = prepare_model(model, cfg, self.device)  # checkpointing, compile, ZeRO-3 needs
        self.optimizer = build_optimizer(model, cfg.optim, self.device)
        self.group_hparams = group_hparams(self.optimizer.param_groups)
        import deepspeed

        ds_cfg = deepspeed_config(cfg, self.world, load_universal=bool(plan and plan.universal))
        with quiet_deepspeed(cfg.trainer.verbose_deepspeed):  # its start-up noise would bury the banner
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_cfg,
                                                        mpu=self.layout.mpu)
        # No DeepSpeed wrapper checks gradients for overflow (ZeRO-0 fp32): our optimizer does.
        self.optimizer.guard_nonfinite_grads = self.engine.optimizer is self.optimizer
        self.model: MoRLM = self.engine.module
        # The ranks of a TP group read the same batches: the loader only knows the DP grid.
        self.loader = build_train_loader(cfg.data, cfg.batch.global_batch_size, cfg.batch.micro_batch_size,
                                         self.layout.dp_rank, self.dp)
        if plan is not None:
            self._resume(plan)
        self.wandb_id = pdist.broadcast_object(wandb_run_id(self.run_dir, self.wandb_id) if self.is_main else None)
        if self.is_main:
            with atomic_open(self.run_dir / "config.yaml", "w") as f:
                f.write(to_yaml(cfg))
            self._keep_tokenizer()
        self.peak_tflops = peak_tflops(self.device, cfg.deepspeed.precision, cfg.trainer.peak_tflops,
                                       cfg.trainer.device_tflops_probe)
        self.logger = RunLogger(cfg, self.run_dir, self.is_main, self.step, self.wandb_id, to_container(cfg))
        self.logger.print(
            f"megamor: {cfg.name} | {self.n_params.describe()} | "
            f"world {self.world}" + (f" = tensor {self.tp} x data {self.dp}" if self.tp > 1 else "")
            + (" + sequence parallel" if self.layout.sequence else "")
            + f" | ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}"
            f"{' compiled' if self.compiled else ''} | "
            f"global batch {cfg.batch.global_batch_size} = {cfg.batch.micro_batch_size} x {self.gas} accum x {self.dp} | "
            f"seq {cfg.data.seq_len} | {self.max_steps} steps | run dir {self.run_dir}"
            + (f" | resumed from step {self.step}" if plan else "")
        )
        return self

    def _keep_tokenizer(self) -> None:
        """A copy of the tokenizer in the run folder, so evaluation and export find it."""
        src = self.cfg.data.tokenizer
        if not src:
            return
        src_dir = Path(src) if Path(src).is_dir() else Path(src).parent
        dst = self.run_dir / "tokenizer"
        dst.mkdir(exist_ok=True)
        for name in ("tokenizer.model", "tokenizer.vocab", "tokenizer_info.json"):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, dst / name)

    def _plan_resume(self) -> ResumePlan | None:
        if not self.cfg.checkpoint.resume:
            if self.is_main:
                set_aside_for_restart(self.run_dir)
            pdist.barrier()
            return None
        ds = self.cfg.deepspeed
        ref = find_resumable(self.run_dir, self.cfg.checkpoint.verify)  # collective; quarantines failures
        plan = plan_for(ref, self.dp, ds.zero_stage, ds.precision) if ref is not None else None
        if plan is not None and plan.universal:
            error = None
            if self.is_main:
                m = plan.ref.meta
                print(f"megamor: resuming {plan.ref.path} (DP {m.get('dp_world_size')}, ZeRO-{m.get('zero_stage')}) with DP "
                      f"{self.dp}, ZeRO-{ds.zero_stage}: converting to a universal checkpoint", flush=True)
                try:
                    ensure_universal(plan.ref)
                except (CheckpointError, UnsafeCheckpointError) as e:
                    error = (isinstance(e, UnsafeCheckpointError), str(e))
            error = pdist.broadcast_object(error)
            if error:  # every rank raises the same error (exit 2 for a refused file)
                raise (UnsafeCheckpointError if error[0] else CheckpointError)(error[1])
        return plan

    def _resume(self, plan: ResumePlan) -> None:
        with safe_torch_load():  # DeepSpeed unpickles with weights_only=False itself
            load_path, _ = self.engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {plan.load_dir / plan.tag}")
        restore_optimizer_hparams(self.engine, self.group_hparams)
        state = safe_load(plan.ref.path / TRAINER_STATE, map_location="cpu")
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.flops_total = float(state.get("flops_total", 0.0))
        self.wandb_id = state.get("wandb_id")
        self.last_saved_step = self.step
        saved_tok = state.get("tokenizer_hash")
        if saved_tok and self.tokenizer_info.get("hash") and saved_tok != self.tokenizer_info["hash"]:
            raise CheckpointError(f"{plan.ref.path}: trained with tokenizer {saved_tok[:12]}, the data now uses "
                                  f"{self.tokenizer_info['hash'][:12]}")
        self.loader.load_state_dict(state["data"])
        rng = state.get("rng") or []
        if len(rng) == self.world:  # one entry per global rank (same layout: check_resume_layout)
            set_rng_state(rng[self.rank])
        else:  # another DP size: per-rank streams cannot map; derive them from the seed and step
            torch.manual_seed(self.cfg.seed + 1000003 * self.step + self.rank)

    # -- one optimizer step -------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> StepResult:
        timer = StepTimer()
        with timer.data_section():
            micro = [self.loader.next_batch() for _ in range(self.gas)]
        counts = [int((mb["targets"] != -100).sum()) for mb in micro]
        # Over the DP group: the ranks of a TP group hold the same tokens (count them once).
        n_global = pdist.all_reduce_(torch.tensor([float(sum(counts))], device=self.device), group=self.layout.dp_group)
        n_global_f = max(1.0, float(n_global.item()))
        step_no = self.step + 1
        inject_nan = self.faults.nan_loss(step_no)
        inject_inf_grad = self.faults.inf_grad(step_no)

        nr = len(self.model.steps)
        loss_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        aux_names: list[str] = []
        aux_sum: torch.Tensor | None = None
        routed_micro: list[torch.Tensor] = []  # per micro-batch [N_r], on the device until the step's end
        depth_hist = torch.zeros(nr + 1, device=self.device)
        shapes: list[tuple[int, int]] = []
        for i, mb in enumerate(micro):
            with timer.data_section():
                mb = self._to_device(mb)
            out = self.engine(
                mb["input_ids"], targets=mb["targets"], position_ids=mb.get("position_ids"), doc_ids=mb.get("doc_ids"),
                return_logits=False,
            )
            lm = out.loss
            if inject_nan:
                lm = lm * float("nan")
            if inject_inf_grad:
                lm = poison_gradients(lm)
            # Mean over the global batch's tokens: DeepSpeed divides by accumulation steps and
            # averages over DP ranks, so scale this micro-batch's mean by its share.
            scale = counts[i] * self.gas * self.dp / n_global_f
            self.engine.backward(lm * scale + out.aux_loss)
            if i < self.gas - 1:
                self.engine.step()  # DeepSpeed's accumulation bookkeeping; no optimizer step
            loss_sum += lm.detach().float() * counts[i]
            nonfinite += (~torch.isfinite(lm.detach())).float()
            if not aux_names:
                aux_names = sorted(out.aux_losses)
                aux_sum = torch.zeros(len(aux_names), device=self.device)
            if aux_names:
                aux_sum += torch.stack([out.aux_losses[k].detach().float().reshape(()) for k in aux_names])
            # Router statistics stay on the device (no host read inside the step's passes).
            st = out.stats
            shapes.append(tuple(mb["input_ids"].shape))  # type: ignore[arg-type]
            if st is not None and nr:
                routed_micro.append(st.routed.float())
                d = st.depth.reshape(-1)
                depth_hist.index_add_(0, d, torch.ones_like(d, dtype=depth_hist.dtype))

        flops = step_flops(self.model.cfg, shapes, routed_micro)  # the step's one host read of routing
        routed = torch.stack(routed_micro).sum(0) if routed_micro else torch.zeros(nr, device=self.device)

        stop_flag = 1.0 if self.stop_request.requested else 0.0
        parts = [loss_sum.reshape(1), nonfinite.reshape(1), torch.tensor([stop_flag, flops], device=self.device)]
        if aux_sum is not None:
            parts.append(aux_sum)
        parts += [routed, depth_hist]
        # Expert choice's learned causal thresholds: each rank tracked its own micro-batches;
        # the average over ranks goes back into every rank's routers (they route alike).
        thresholds = self.model.router_thresholds()
        n_thr = 0 if thresholds is None else thresholds.numel()
        if thresholds is not None:
            parts.append(thresholds.float())
        # Over the world (a stop signal on any rank stops all); every TP rank counted the same
        # tokens, so per-token sums are divided by the TP size.
        vec = pdist.all_reduce_(torch.cat(parts).double())
        if self.tp > 1:
            vec[0] /= self.tp
            vec[3:] /= self.tp
        if thresholds is not None:
            vec[vec.numel() - n_thr :] /= self.dp
            self.model.set_router_thresholds(vec[vec.numel() - n_thr :])
        values = vec.tolist()
        thr_values = values[len(values) - n_thr :]
        values = values[: len(values) - n_thr]
        loss = values[0] / n_global_f
        skipped = values[1] > 0 or not math.isfinite(loss)
        stop = values[2] > 0

        # The step: every rank has the same `skipped` decision (see optim.SkippableStep).
        lr = self.schedule.lr_at(step_no)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.skip_next_step = skipped
        self.optimizer.nonfinite_grads = False
        ds_skipped = self.engine.skipped_steps
        try:
            self.engine.step()
        finally:
            self.optimizer.skip_next_step = False
        why = "non-finite loss" if skipped else None
        if not skipped and (self.engine.skipped_steps > ds_skipped or self.optimizer.nonfinite_grads):
            # DeepSpeed's overflow check (ZeRO, bf16) or the ZeRO-0 guard (optim.py) skipped the update.
            skipped, why = True, "non-finite gradients"
        if not skipped:
            load = self.model.loss_free_load()
            if load is not None:
                self.model.update_loss_free_bias(pdist.all_reduce_(load.to(self.device), group=self.layout.dp_group))

        grad_norm = None
        if not skipped:
            g = self.engine.get_global_grad_norm()
            grad_norm = float(g) if g is not None else None
            if grad_norm is not None and not math.isfinite(grad_norm):
                skipped, why, grad_norm = True, "non-finite gradient norm", None
        k = len(aux_names)
        n_micro = self.gas * self.dp
        aux = {name: values[4 + j] / n_micro for j, name in enumerate(aux_names)}
        for r, v in enumerate(thr_values):  # the causal cut after this step (a logit)
            if self.model.cfg.capacities[r] < 1.0:
                aux[f"router_health/r{r + 1}/threshold"] = v
        routed_l = values[4 + k : 4 + k + nr]
        hist = torch.tensor(values[4 + k + nr :])
        return StepResult(loss, int(n_global_f), skipped, stop, values[3], timer.data, timer.elapsed(), grad_norm, aux,
                          routed_l, hist, why)

    # -- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.data.valid:
            return {}
        self.engine.eval()
        modes = [("", False)]
        if cfg.eval.causal_routing and cfg.model.router.type == "expert_choice":
            modes.append(("_causal", True))
        bs = cfg.eval_micro_batch_size
        results: dict[str, float] = {}
        totals = {suffix: [0.0, 0.0] for suffix, _ in modes}
        router_val = RouterValidation(self.model, self.device)
        for idx, es in enumerate(build_eval_sets(cfg.data)):
            label = Path(es.name).name or f"valid{idx}"
            if len(cfg.data.valid) > 1:
                label = f"{idx}_{label}"
            n_batches = -(-len(es.dataset) // bs)
            if cfg.eval.max_batches is not None:
                n_batches = min(n_batches, cfg.eval.max_batches)
            rounds = -(-n_batches // self.dp)  # equal forward counts on every rank (ZeRO-3 gathers)
            for suffix, causal in modes:
                sums = torch.zeros(2, dtype=torch.float64, device=self.device)
                it = iter_eval_batches(es.dataset, bs, cfg.eval.max_batches, self.layout.dp_rank, self.dp,
                                       cfg.data.document_masking)
                first = None
                router_val.start(causal)
                for _ in range(rounds):
                    self.faults.before_eval_batch(self.rank)
                    if self._stop_agreed():  # a long validation pass yields to a stop signal
                        self.engine.train()
                        raise StopRequested
                    batch = next(it, None)
                    real = batch is not None
                    batch = batch if real else first
                    if batch is None:  # this rank got no batch at all: any tokens will do
                        batch = {"input_ids": torch.zeros(1, cfg.data.seq_len, dtype=torch.long),
                                 "targets": torch.zeros(1, cfg.data.seq_len, dtype=torch.long)}
                    first = first or batch
                    b = self._to_device(batch)
                    out = self.engine(b["input_ids"], targets=b["targets"], position_ids=b.get("position_ids"),
                                      doc_ids=b.get("doc_ids"), causal_routing=causal,
                                      return_logits=router_val.wants_logits(causal))
                    if real:
                        n = float((b["targets"] != -100).sum())
                        sums += torch.tensor([float(out.loss) * n, n], dtype=torch.float64, device=self.device)
                        router_val.update(out, b["targets"], causal)
                router_val.stop()
                pdist.all_reduce_(sums, group=self.layout.dp_group)  # a TP group's ranks saw the same batches
                s, n = sums.tolist()
                results[f"val/{label}/loss{suffix}"] = s / max(n, 1.0)
                totals[suffix][0] += s
                totals[suffix][1] += n
        for suffix, (s, n) in totals.items():
            results[f"val/loss{suffix}"] = s / max(n, 1.0)
        results["val/ppl"] = math.exp(min(results["val/loss"], 50.0))
        results.update(router_val.results(group=self.layout.dp_group))
        self.engine.train()
        return results

    def _stop_agreed(self) -> bool:
        """One small all-reduce: did any rank get a stop signal?"""
        flag = torch.tensor([1.0 if self.stop_request.requested else 0.0], device=self.device)
        return bool(pdist.all_reduce_(flag).item() > 0)

    def _stop(self, where: str = "") -> int:
        sig = self.stop_request.signum
        self.logger.print(f"stop requested (signal {sig if sig is not None else 'on another rank'}) at step "
                          f"{self.step}{where}: saving and exiting with {EXIT_PREEMPTED}")
        if self.last_saved_step != self.step and self.step > 0:
            self.save()
        self._record_exit_status(EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    # -- checkpointing -------------------------------------------------------------------
    def save(self) -> Path:
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
        path = self.ckpt.save(self.engine, self.step, {"megamor": state}, to_yaml(self.cfg), meta,
                              extra_files={TRAINER_STATE: state})
        self.last_saved_step = self.step
        self.logger.print(f"checkpoint: {path}")
        return path

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        if self.step >= self.max_steps:
            self.logger.print(f"already trained for {self.step} >= {self.max_steps} steps; nothing to do")
            self.stop_request.uninstall()
            self.logger.close()
            return EXIT_OK
        window = WindowStats()
        exit_code = EXIT_OK
        try:
            if self._stop_agreed():  # a signal during set-up
                return self._stop()
            while self.step < self.max_steps:
                r = self.train_step()
                self.step += 1
                self.tokens += r.tokens
                self.flops_total += r.flops
                self._accumulate(window, r)
                if r.skipped:
                    self.skipped_steps += 1
                    self.consecutive_nonfinite += 1
                    self.logger.print(f"step {self.step}: {r.skip_reason}, step skipped "
                                      f"({self.consecutive_nonfinite} in a row, {self.skipped_steps} in total)")
                    if self.consecutive_nonfinite >= cfg.trainer.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{self.consecutive_nonfinite} non-finite steps in a row (steps "
                            f"{self.step - self.consecutive_nonfinite + 1}-{self.step}, last: {r.skip_reason}); aborting. "
                            f"{self._newest_good_checkpoint()}: lower optim.lr, check the data, or if the weights are "
                            "damaged resume from an earlier tag (move the later ones aside).")
                else:
                    self.consecutive_nonfinite = 0
                if self.step % cfg.logging.log_every == 0 or self.step == self.max_steps:
                    self._log(window)
                    window = WindowStats()
                self.logger.advance(self.step)
                self.faults.after_step(self.step, self.rank)
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    if self.consecutive_nonfinite:  # do not let keep_last prune the last good tag for this state
                        self.logger.print(f"step {self.step}: checkpoint deferred ({self.consecutive_nonfinite} "
                                          "non-finite steps in a row)")
                    else:
                        self.save()
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    self.logger.log(self.step, self.evaluate())
                if r.stop:
                    exit_code = self._stop()
                    break
            else:
                if cfg.eval.at_end and (not cfg.eval.every_steps or self.step % cfg.eval.every_steps):
                    self.logger.log(self.step, self.evaluate())
                if cfg.checkpoint.save_final and self.last_saved_step != self.step:
                    self.save()
        except StopRequested:  # agreed during validation
            exit_code = self._stop(" during validation")
        finally:
            self.stop_request.uninstall()
            self.logger.close()
        return exit_code

    def close(self) -> None:
        """Release the DeepSpeed engine: its gradient hooks tie parameters, optimizer and
        process groups into a cycle through C++ autograd nodes that no garbage collection
        frees, so without this they live until the interpreter shuts down."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.destroy()
        for name in ("model", "optimizer", "loader"):
            self.__dict__.pop(name, None)

    def _newest_good_checkpoint(self) -> str:
        """The newest checkpoint saved before the current run of non-finite steps began."""
        from megamor.train.checkpoint import list_complete

        before = self.step - self.consecutive_nonfinite
        good = [c for c in list_complete(self.run_dir) if c.step <= before] if self.is_main else []
        return f"The newest checkpoint from before these steps is {good[-1].path}" if good else \
            "No checkpoint from before these steps exists"

    def _record_exit_status(self, code: int) -> None:
        """Rank 0 writes the exit status to $MEGAMOR_EXIT_FILE before any rank may exit. Under
        `srun --kill-on-bad-exit` the first rank to exit 75 gets the others killed, so srun's own
        status can hide the stop; slurm/train.sbatch reads this file to decide on a requeue."""
        path = os.environ.get("MEGAMOR_EXIT_FILE")
        if path and self.is_main:
            with atomic_open(Path(path), "w") as f:
                f.write(f"{code}\n")
        pdist.barrier()

    def _accumulate(self, w: WindowStats, r: StepResult) -> None:
        w.steps += 1
        w.time += r.time
        w.data_time += r.data_time
        w.tokens += r.tokens
        w.flops += r.flops
        if r.skipped:
            w.skipped += 1
            return
        w.loss += r.loss
        if r.grad_norm is not None:
            w.grad_norm += r.grad_norm
            w.grad_norm_steps += 1
        for k, v in r.aux.items():
            w.aux[k] = w.aux.get(k, 0.0) + v
        if r.tokens_per_step:
            w.add_routing(r.tokens_per_step, r.depth_hist)

    def _log(self, w: WindowStats) -> None:
        good = w.steps - w.skipped
        m: dict[str, Any] = {
            "train/loss": w.loss / good if good else float("nan"),
            "train/lr": self.schedule.lr_at(self.step),
            "train/grad_norm": w.grad_norm / w.grad_norm_steps if w.grad_norm_steps else None,
            "train/tokens": self.tokens,
            "train/skipped_steps": self.skipped_steps,
            "perf/tokens_per_s": w.tokens / w.time if w.time else 0.0,
            "perf/step_time_s": w.time / w.steps,
            "perf/data_time_s": w.data_time / w.steps,
            "perf/model_tflops_total": self.flops_total / 1e12,
            "perf/peak_mem_gb": peak_memory_bytes(self.device) / 2**30,
        }
        for k, v in w.aux.items():
            m[f"train/{k}"] = v / good if good else float("nan")
        if self.peak_tflops and w.time:
            achieved = w.flops / w.time / self.world / 1e12  # per device
            m["perf/mfu"] = achieved / self.peak_tflops
            hw = 4.0 / 3.0 if self.cfg.trainer.activation_checkpointing else 1.0
            m["perf/hfu"] = achieved * hw / self.peak_tflops
        hist = None
        if w.tokens_per_step and w.depth_hist is not None:
            total = float(w.depth_hist.sum()) or 1.0
            for r, n in enumerate(w.tokens_per_step):
                m[f"router/selected_frac_r{r + 1}"] = n / total
            depths = torch.arange(len(w.depth_hist), dtype=torch.float64)
            m["router/mean_depth"] = float((w.depth_hist.double() * depths).sum()) / total
            edges = [d - 0.5 for d in range(len(w.depth_hist) + 1)]
            hist = {"router/depth_hist": (w.depth_hist.tolist(), edges)}
        self.logger.log(self.step, m, hist)
