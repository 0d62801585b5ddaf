"""Model + DeepSpeed engine assembly, in one place: the trainer, the training benchmark and the
tests that measure engines all build theirs with `build_engine`, so they run the same model
the same way (the non-finite-gradient guard and DeepSpeed's quieted start-up included).

    seed -> MoRLM(cfg.model) -> [init_from weights] -> parallelize (TP/SP) -> prepare_model
    (activation checkpointing, per-layer compile, ZeRO-3 registration) -> optimizer ->
    deepspeed.initialize

`plain_model` builds the same module without an engine (ZeRO-3 in-loop evals fill it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megamor.model import MoRLM
from megamor.model.summary import ParamCounts
from megamor.parallel.ds_noise import quiet_deepspeed
from megamor.train.compile import compile_layers, compile_wanted
from megamor.train.config import ExperimentConfig
from megamor.train.ds_config import deepspeed_config
from megamor.train.init_from import InitReport, load_init_weights
from megamor.train.optim import build_optimizer, freeze_for
from megamor.train.parallelize import Layout, build_layout, parallelize


def prepare_model(model: MoRLM, cfg: ExperimentConfig, device: torch.device) -> bool:
    """The document-mask kernel (`trainer.doc_mask_impl`), activation checkpointing, per-layer
    torch.compile (`trainer.compile`) and the ZeRO-3 registration the chunked loss needs.
    Returns whether the layers were compiled."""
    model.doc_mask_impl = cfg.trainer.doc_mask_impl
    if cfg.trainer.activation_checkpointing:
        model.enable_activation_checkpointing()  # torch non-reentrant: safe with reused blocks + ZeRO
    compiled = compile_wanted(cfg.trainer.compile, device, cfg.deepspeed.zero_stage, cfg.trainer.activation_checkpointing)
    if compiled:
        compile_layers(model)  # per layer, in place: a shared block compiles once
    if cfg.deepspeed.zero_stage == 3:
        # The loss reads the LM head's weight outside the head's own forward: ZeRO-3 must
        # gather it for the whole forward of the model.
        from deepspeed.runtime.zero.partition_parameters import (
            register_external_parameter,
        )

        register_external_parameter(model, model.lm_head.weight)
    return compiled


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer  # ours (SkippableStep), wrapped by DeepSpeed's where it wraps one
    layout: Layout
    n_params: ParamCounts  # counted before TP / ZeRO-3 split the parameters
    compiled: bool
    init: InitReport | None  # what `init_from` loaded, or None

    @property
    def model(self) -> MoRLM:
        return self.engine.module


def build_model(cfg: ExperimentConfig, device: torch.device, *, world: int = 1, rank: int = 0,
                layout: Layout | None = None, seed: int | None = None, init_from: str | None = None,
                compile_backend: str | None = None) -> tuple[MoRLM, ParamCounts, bool, InitReport | None, Layout]:
    """The model half of `build_engine` (the TP benchmark times it without DeepSpeed):
    (model, parameter counts before any split, compiled, what init_from loaded, layout)."""
    if layout is None:
        layout = build_layout(cfg.parallel.tensor, world, rank, cfg.parallel.sequence)
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = MoRLM(cfg.model)  # the full model on every rank: TP cuts its shards from it
    init = load_init_weights(model, init_from) if init_from else None
    n_params = ParamCounts.of(model)
    parallelize(model, layout)
    compiled = prepare_model(model, cfg, device)
    if compile_backend is not None:
        compile_layers(model, backend=compile_backend)
        compiled = True
    return model, n_params, compiled, init, layout


def plain_model(cfg: ExperimentConfig, layout: Layout, device: torch.device) -> MoRLM:
    """A module of the same structure as the engine's (TP shards included) with no ZeRO hooks:
    the weights are whatever the caller copies in (megamor.train.downstream fills it from a
    ZeRO-3 engine). Not compiled, no activation checkpointing: it only runs under no_grad."""
    model = MoRLM(cfg.model)  # outside any zero.Init: plain tensors, whole on this rank
    parallelize(model, layout)
    model.doc_mask_impl = cfg.trainer.doc_mask_impl
    return model.to(device).eval()


def build_engine(cfg: ExperimentConfig, device: torch.device, *, world: int = 1, rank: int = 0,
                 layout: Layout | None = None, seed: int | None = None, init_from: str | None = None,
                 load_universal: bool = False, compile_backend: str | None = None) -> BuiltEngine:
    """The engine a run of `cfg` trains with, on `world` processes (this one is `rank`; the
    process group must exist when world > 1). `seed` defaults to cfg.seed; `init_from` loads
    weights before any parallelism cuts them; `compile_backend` compiles every layer with that
    torch.compile backend on top of what `trainer.compile` decides (benchmarks compare backends);
    `load_universal` asks DeepSpeed to load a universal checkpoint next."""
    model, n_params, compiled, init, layout = build_model(cfg, device, world=world, rank=rank, layout=layout, seed=seed,
                                                          init_from=init_from, compile_backend=compile_backend)
    freeze_for(model, cfg.trainer.train_only)  # trainer.train_only: routers freezes the rest
    optimizer = build_optimizer(model, cfg.optim, device)
    import deepspeed

    ds_cfg = deepspeed_config(cfg, world, load_universal=load_universal)
    # ZeRO-0 + bf16: DeepSpeed's wrapper initialises the optimizer's state by a step on zero
    # gradients, an AdamW step (count 1, a weight decay at the peak LR) before training; skip it,
    # so the first real step is Adam's first (bias correction) and the weights start as built.
    optimizer.skip_next_step = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "bf16"
    try:
        with quiet_deepspeed(cfg.trainer.verbose_deepspeed):  # its start-up noise would bury megamor's lines
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg, mpu=layout.mpu)
    finally:
        optimizer.skip_next_step = False
    # No DeepSpeed wrapper checks gradients for overflow (ZeRO-0 fp32): our optimizer does.
    optimizer.guard_nonfinite_grads = engine.optimizer is optimizer  # type: ignore[attr-defined]
    return BuiltEngine(engine, optimizer, layout, n_params, compiled, init)
