"""AdamW with parameter groups, and a step that can be skipped.

Groups: weight decay for matrices; none for norms, biases (any 1-D parameter) and the token
embedding (tied to the LM head when tie_embeddings), unless optim.decay_embeddings.

Skipping: a non-finite loss must not reach the weights or the Adam moments. DeepSpeed only
skips steps on its own for fp16 (and ZeRO-1/2 with some bf16 settings), so the check is made
here, in the optimizer DeepSpeed wraps: the trainer sets `skip_next_step` (agreed by all
ranks) before `engine.step()`, and `step()` then leaves parameters, moments and the Adam step
count untouched. DeepSpeed still clears the gradients as usual. This works for every ZeRO
stage because each one ends in the client optimizer's `step()`.

Non-finite gradients with a finite loss (a corrupted weight, an overflow): DeepSpeed's ZeRO and
bf16/fp16 optimizers detect them and skip the step themselves (engine.skipped_steps counts it).
Without a wrapper (ZeRO-0 fp32) nothing checks, so the trainer sets `guard_nonfinite_grads`
and step() then skips when any gradient is inf/NaN on any rank, and says so in
`nonfinite_grads`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from megamor.parallel import dist as pdist
from megamor.train.config import OptimConfig

NO_DECAY = "no_decay"
DECAY = "decay"


class SkippableStep:
    """Mixin for a torch optimizer: `skip_next_step = True` turns the next step() into a no-op."""

    skip_next_step: bool = False
    guard_nonfinite_grads: bool = False
    nonfinite_grads: bool = False  # set by a step() the guard skipped; the trainer resets it

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip_next_step:
            return None
        if self.guard_nonfinite_grads and not self._grads_finite():
            self.nonfinite_grads = True
            return None
        return super().step(closure)  # type: ignore[misc]

    def _grads_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros(1, device=params[0].device if params else "cpu")
        if grads:
            bad = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().reshape(1)
        # Every rank must take the same decision (gradients differ under model parallelism).
        return not bool(pdist.all_reduce_(bad, op=torch.distributed.ReduceOp.MAX).item())


def skippable(cls: type) -> type:
    return type(f"Skippable{cls.__name__}", (SkippableStep, cls), {})


ROUTER_PREFIXES = ("routers.", "depth_router.")  # state-dict names of the router modules


def freeze_for(model: nn.Module, train_only: str) -> int:
    """`trainer.train_only`: with "routers", every parameter outside the routers stops
    requiring gradients (so `param_groups` leaves it out of the optimizer). Returns the
    number of trainable parameters."""
    if train_only == "routers":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(ROUTER_PREFIXES))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Two groups (decay / no decay), each parameter once even when tied or shared."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Embeddings replaced from outside (vocab-parallel shards) mark their weight instead.
    embedding_ids |= {id(p) for p in model.parameters() if getattr(p, "is_embedding", False)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or (id(p) in embedding_ids and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": DECAY},
        {"params": no_decay, "weight_decay": 0.0, "name": NO_DECAY},
    ]
    return [g for g in groups if g["params"]]


def group_hparams(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-group settings to re-apply after loading a checkpoint (see megamor.runs.resume)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    impl = cfg.impl
    if impl == "auto":
        impl = "torch_fused" if device.type == "cuda" else "torch"
    if impl == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam

        return skippable(FusedAdam)(groups, adam_w_mode=True, **kw)
    if impl == "torch_fused":
        return skippable(torch.optim.AdamW)(groups, fused=True, **kw)
    return skippable(torch.optim.AdamW)(groups, foreach=device.type == "cuda", **kw)
