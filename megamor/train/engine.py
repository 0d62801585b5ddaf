"""What the trainer applies to a plainly built model before DeepSpeed wraps it, in one place
(the benchmark builds its engines the same way)."""

from __future__ import annotations

import torch

from megamor.model import MoRLM
from megamor.train.compile import compile_layers, compile_wanted
from megamor.train.config import ExperimentConfig


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
