"""One optimizer step on a DeepSpeed engine.

  1. fetch this rank's micro-batches (accumulation = global / (micro x DP));
  2. all-reduce the number of target tokens, so the loss is the mean over the *global* batch
     (each micro-batch's mean is rescaled by its share; the result does not depend on how the
     batch is split over ranks and micro-batches);
  3. forward + backward each micro-batch through the engine (router losses added with their
     configured weights);
  4. one all-reduce of [loss, non-finite flag, stop request, FLOPs, router statistics, what
     callbacks add (router-state sync: expert choice's thresholds)]: every rank takes the same
     decisions (skip a non-finite step, stop on a signal);
  5. set the scheduled learning rate, `engine.step()` (clipping, ZeRO, AdamW); the callbacks'
     after_optimizer_step (router-state sync: the token-choice loss-free bias).

The loop's callbacks (megamor/train/callbacks/) are called at their hooks here: before_forward,
modify_loss, after_backward, step_reduction/step_reduced, before/after_optimizer_step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from megamor.observe.step_observer import StepObserver
from megamor.parallel import dist as pdist
from megamor.train.callbacks.hooks import Callbacks
from megamor.train.metrics import step_flops
from megamor.train.schedule import LRSchedule
from megamor.train.signals import StopRequest


@dataclass
class StepResult:
    loss: float
    tokens: int
    skipped: bool
    stop: bool
    flops: float
    time: float  # the step's wall time (data time: the observer's time/data)
    grad_norm: float | None
    aux: dict[str, float]
    tokens_per_step: list[float]
    depth_hist: torch.Tensor
    skip_reason: str | None = None  # non-finite loss | non-finite gradients | non-finite gradient norm


@dataclass
class _Passes:
    """What the forward/backward passes of one step leave on the device (read once, reduced)."""

    loss_sum: torch.Tensor
    nonfinite: torch.Tensor
    depth_hist: torch.Tensor
    aux_names: list[str] = field(default_factory=list)
    aux_sum: torch.Tensor | None = None
    routed_micro: list[torch.Tensor] = field(default_factory=list)  # per micro-batch [N_r]
    shapes: list[tuple[int, int]] = field(default_factory=list)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainStep:
    """Runs optimizer steps; holds no progress (the Trainer counts steps and tokens)."""

    def __init__(self, engine: Any, optimizer: Any, loader: Any, layout: Any, schedule: LRSchedule,
                 stop_request: StopRequest, device: torch.device, gas: int, tp: int, dp: int,
                 observe: StepObserver | None = None, callbacks: Callbacks | None = None):
        self.engine, self.optimizer, self.loader, self.layout = engine, optimizer, loader, layout
        self.observe = observe or StepObserver(device, activation_meter=False)  # phase timers, profiler ranges
        self.callbacks = callbacks or Callbacks()  # after_backward, before_optimizer_step
        self.rank = pdist.rank()
        self.model = engine.module
        self.schedule, self.stop_request = schedule, stop_request
        self.device, self.gas = device, gas
        self.tp, self.dp = tp, dp  # tensor- and data-parallel sizes

    def __call__(self, step_no: int) -> StepResult:
        """Optimizer step `step_no` (1-based)."""
        self.model.set_train_step(step_no)  # router warmups (megamor.model.routing); the trainer's step: resume-exact
        t0 = time.perf_counter()
        with self.observe.phase("data"):
            micro = [self.loader.next_batch() for _ in range(self.gas)]
        counts = [int((mb["targets"] != -100).sum()) for mb in micro]
        # Over the DP group: the ranks of a TP group hold the same tokens (count them once).
        n_global = pdist.all_reduce_(torch.tensor([float(sum(counts))], device=self.device), group=self.layout.dp_group)
        n_global_f = max(1.0, float(n_global.item()))
        passes = self._passes(micro, counts, n_global_f, step_no)
        values = self._reduce(passes, step_no)
        loss = values[0] / n_global_f
        skipped = values[1] > 0 or not math.isfinite(loss)
        stop = values[2] > 0
        skipped, why, grad_norm = self._optimizer_step(step_no, skipped)

        nr, k = len(self.model.steps), len(passes.aux_names)
        n_micro = self.gas * self.dp
        aux = {name: values[4 + j] / n_micro for j, name in enumerate(passes.aux_names)}
        routed_l = values[4 + k : 4 + k + nr]
        hist = torch.tensor(values[4 + k + nr :])
        return StepResult(loss, int(n_global_f), skipped, stop, values[3], time.perf_counter() - t0, grad_norm, aux,
                          routed_l, hist, why)

    def _passes(self, micro: list[dict[str, torch.Tensor]], counts: list[int], n_global_f: float,
                step_no: int) -> _Passes:
        """Forward + backward of every micro-batch; router statistics stay on the device."""
        nr = len(self.model.steps)
        p = _Passes(torch.zeros((), device=self.device), torch.zeros((), device=self.device),
                    torch.zeros(nr + 1, device=self.device))
        for i, mb in enumerate(micro):
            with self.observe.phase("data"):
                mb = to_device(mb, self.device)
            with self.observe.forward():
                self.callbacks.before_forward(step_no, i)
                out = self.engine(
                    mb["input_ids"], targets=mb["targets"], position_ids=mb.get("position_ids"),
                    doc_ids=mb.get("doc_ids"), return_logits=False,
                )
            lm = self.callbacks.modify_loss(step_no, i, out.loss)  # fault injection's non-finite losses
            # Mean over the global batch's tokens: DeepSpeed divides by accumulation steps and
            # averages over DP ranks, so scale this micro-batch's mean by its share.
            scale = counts[i] * self.gas * self.dp / n_global_f
            with self.observe.phase("backward"):
                self.engine.backward(lm * scale + out.aux_loss)
                if i < self.gas - 1:
                    self.engine.step()  # DeepSpeed's accumulation bookkeeping; no optimizer step
            self.callbacks.after_backward(step_no, i)
            p.loss_sum += lm.detach().float() * counts[i]
            p.nonfinite += (~torch.isfinite(lm.detach())).float()
            if not p.aux_names:
                p.aux_names = sorted(out.aux_losses)
                p.aux_sum = torch.zeros(len(p.aux_names), device=self.device)
            if p.aux_names:
                p.aux_sum += torch.stack([out.aux_losses[k].detach().float().reshape(()) for k in p.aux_names])
            st = out.stats
            p.shapes.append(tuple(mb["input_ids"].shape))  # type: ignore[arg-type]
            if st is not None and nr:
                p.routed_micro.append(st.routed.float())
                d = st.depth.reshape(-1)
                p.depth_hist.index_add_(0, d, torch.ones_like(d, dtype=p.depth_hist.dtype))
        return p

    def _reduce(self, p: _Passes, step_no: int) -> list[float]:
        """The step's one all-reduce over the world, the callbacks' contributions included (each
        gets its slice back: router-state sync averages expert choice's thresholds there)."""
        nr = len(self.model.steps)
        flops = step_flops(self.model.cfg, p.shapes, p.routed_micro)  # the step's one host read of routing
        routed = torch.stack(p.routed_micro).sum(0) if p.routed_micro else torch.zeros(nr, device=self.device)
        stop_flag = 1.0 if self.stop_request.requested else 0.0
        parts = [p.loss_sum.reshape(1), p.nonfinite.reshape(1), torch.tensor([stop_flag, flops], device=self.device)]
        if p.aux_sum is not None:
            parts.append(p.aux_sum)
        parts += [routed, p.depth_hist]
        extra = self.callbacks.step_reductions(step_no)
        n_own = sum(t.numel() for t in parts)
        parts += [t.float() for _, t in extra]
        # Over the world (a stop signal on any rank stops all); every TP rank counted the same
        # tokens, so per-token sums (and the callbacks' slices) are divided by the TP size.
        vec = pdist.all_reduce_(torch.cat(parts).double())
        if self.tp > 1:
            vec[0] /= self.tp
            vec[3:] /= self.tp
        at = n_own
        for cb, t in extra:
            cb.step_reduced(step_no, vec[at : at + t.numel()])
            at += t.numel()
        return vec[:n_own].tolist()

    def _optimizer_step(self, step_no: int, skipped: bool) -> tuple[bool, str | None, float | None]:
        """(skipped, why, grad norm). Every rank has the same `skipped` decision (optim.SkippableStep)."""
        lr = self.schedule.lr_at(step_no)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.skip_next_step = skipped
        self.optimizer.nonfinite_grads = False
        ds_skipped = self.engine.skipped_steps
        own_norm = None
        if self.optimizer.guard_nonfinite_grads and not skipped:
            # No DeepSpeed wrapper (ZeRO-0 fp32): its clipping computes the norm and drops it, so
            # take it here, before the step, by the same rule (model-parallel aware, over DP).
            from deepspeed.runtime.utils import clip_grad_norm_

            own_norm = clip_grad_norm_(list(self.engine.module.parameters()), float("inf"), mpu=self.engine.mpu)
        self.callbacks.before_optimizer_step(step_no)
        try:
            with self.observe.phase("optimizer"):
                self.engine.step()
        finally:
            self.optimizer.skip_next_step = False
        why = "non-finite loss" if skipped else None
        if not skipped and (self.engine.skipped_steps > ds_skipped or self.optimizer.nonfinite_grads):
            # DeepSpeed's overflow check (ZeRO, bf16) or the ZeRO-0 guard (optim.py) skipped the update.
            skipped, why = True, "non-finite gradients"
        self.callbacks.after_optimizer_step(step_no, skipped)  # router-state sync: the loss-free bias
        grad_norm = None
        if not skipped:
            g = self.engine.get_global_grad_norm()
            g = g if g is not None else own_norm
            grad_norm = float(g) if g is not None else None
            if grad_norm is not None and not math.isfinite(grad_norm):
                skipped, why, grad_norm = True, "non-finite gradient norm", None
        return skipped, why, grad_norm
