"""The full fp32 model state dict of a tag, whatever its ZeRO stage and tensor-parallel size.

ZeRO 1-3 (partitioned fp32 master weights): DeepSpeed's zero_to_fp32, under the weights-only
loader. ZeRO-0: the module states of the model-states file. A tensor-parallel tag holds one
set of files per TP rank (mp_rank_XX): each is consolidated alone, then the shards are merged
(megamor.parallel.tensor_parallel.merge_shards). No process group is needed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from megamor.parallel.tensor_parallel import merge_shards
from megamor.runs.layout import CheckpointError, CheckpointRef
from megamor.runs.safe_load import load as safe_load
from megamor.runs.safe_load import safe_torch_load


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    tp = int(ref.meta.get("tensor_parallel", 1))
    if tp > 1:
        return merge_shards([_tp_rank_state_dict(ref, r) for r in range(tp)])
    return _tp_rank_state_dict(ref, 0)


def _tp_rank_state_dict(ref: CheckpointRef, tp_rank: int) -> dict[str, torch.Tensor]:
    mp = f"mp_rank_{tp_rank:02d}"
    optim = sorted(ref.path.glob(f"*{mp}_optim_states.pt"))
    if optim and ref.meta.get("zero_stage", 0) > 0:
        # deepspeed is imported here only: loading an export or ZeRO-0 tag needs none of it.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load():  # zero_to_fp32 unpickles with weights_only=False itself
            if not any(ref.path.glob("*mp_rank_01_optim_states.pt")):  # no tensor parallelism
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
            else:
                # zero_to_fp32 reads only mp_rank_00 files: show it this rank's files alone, under that name.
                with tempfile.TemporaryDirectory(prefix=".tp-merge-", dir=ref.root) as tmp:
                    view = Path(tmp) / ref.tag
                    view.mkdir()
                    for f in [ref.path / f"{mp}_model_states.pt", *optim]:
                        (view / f.name.replace(mp, "mp_rank_00")).symlink_to(f.resolve())
                    sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ref.tag)
        sd = {**_frozen_from_module(ref.path / f"{mp}_model_states.pt", sd), **sd}
    else:
        f = ref.path / f"{mp}_model_states.pt"
        if not f.is_file():
            raise CheckpointError(f"{ref.path}: no model states file {f.name}")
        sd = safe_load(f, map_location="cpu")["module"]
    return {k: v.detach().float().clone() for k, v in sd.items()}


def _frozen_from_module(f: Path, have: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters zero_to_fp32 left out, from the module states. Frozen parameters
    (`trainer.train_only`) have no fp32 master copy, and at ZeRO-1 DeepSpeed records none of
    them for zero_to_fp32 (it does at ZeRO 2/3): the module holds them whole (in the training
    precision: unchanged from the start under fp32)."""
    if not f.is_file():
        return {}
    module = safe_load(f, map_location="cpu").get("module") or {}
    return {k: v for k, v in module.items() if k not in have and v.numel() > 0}

