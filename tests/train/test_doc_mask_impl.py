"""trainer.doc_mask_impl reaches the model (the kernel itself: tests/model/test_flex.py)."""

from __future__ import annotations

import torch

from megamor.train.config import load_experiment
from megamor.train.engine import prepare_model
from tests.model.helpers import mor


def test_prepare_model_sets_the_document_mask_kernel():
    base = ["trainer.max_steps=10", "data.train=[x]", "batch.global_batch_size=8", "data.document_masking=true"]
    for impl in ("flex", "dense"):
        model = mor("expert_choice", nr=2)
        prepare_model(model, load_experiment([], base + [f"trainer.doc_mask_impl={impl}"]), torch.device("cpu"))
        assert model.doc_mask_impl == impl
