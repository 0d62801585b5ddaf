"""Export: consolidated fp32 weights and Hugging Face folders, checked by logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamor.env import repo_root
from megamor.export import load_exported
from megamor.runs.load import load_model_from_run
from megamor.testing.distributed import run_distributed
from tests.train.helpers import assert_ok, launch, train_env

pytestmark = pytest.mark.launch  # every test here starts processes (docs/testing.md)

X = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def export_cli(run_dir: Path, out: Path, tmp: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "megamor.export", str(run_dir), "--out", str(out)], cwd=repo_root(),
                       env=train_env(tmp), capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@torch.no_grad()
def test_vanilla_export_loads_as_llama_with_identical_logits(tiny_config, tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    run = launch(tiny_config, tmp_path / "vanilla", ["model.sharing=none", "model.num_recursions=1",
                                                     "model.router.type=none", "trainer.max_steps=3"])
    assert_ok(run)
    export_cli(run.run_dir, tmp_path / "hf", tmp_path)
    ours, _ = load_model_from_run(run.run_dir)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    reloaded, _ = load_exported(tmp_path / "hf")
    a = ours(X).logits
    assert torch.allclose(hf(X).logits, a, atol=1e-5, rtol=0), (hf(X).logits - a).abs().max()
    assert torch.equal(reloaded(X).logits, a)
    assert (tmp_path / "hf" / "megamor.pt.json").is_file()
    # config.json names the class (tools such as vLLM pick it from `architectures`) and the run's
    # own special ids, which transformers' generate stops at (it wrote LlamaConfig's 1 and 2)
    import json

    from megamor.data.tokenizer import load_tokenizer
    from megamor.export import special_token_ids
    from megamor.runs.find import find_tokenizer

    info = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert info["architectures"] == ["LlamaForCausalLM"]
    found = find_tokenizer(tmp_path / "hf")
    want = special_token_ids(load_tokenizer(found) if found else None)
    assert {k: info.get(k) for k in want} == want and hf.generation_config.eos_token_id == want["eos_token_id"]
    assert special_token_ids(None) == {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _train_zero3_and_save(rank: int, world: int, run_dir: str) -> None:
    """In each of 2 gloo processes: a ZeRO-3 engine (every tensor partitioned), 3 steps, the
    logits the engine computes, and a checkpoint through megamor's CheckpointManager."""
    from megamor.runs.save import CheckpointManager
    from megamor.train.config import experiment_from_dict, to_yaml
    from megamor.train.engine import build_engine

    cfg = experiment_from_dict({
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                  "max_seq_len": 64, "sharing": "middle_cycle", "num_recursions": 2, "router": {"type": "expert_choice"}},
        "data": {"train": ["unused"], "seq_len": 32},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "trainer": {"max_steps": 3, "activation_checkpointing": True},
        "deepspeed": {"zero_stage": 3, "precision": "fp32",
                      "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    })
    engine = build_engine(cfg, torch.device("cpu"), world=world, rank=rank, seed=0).engine
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x = torch.randint(0, 512, (2, 32), generator=g)
        out = engine(x, targets=x)
        engine.backward(out.loss + out.aux_loss)
        engine.step()
    assert all(p.numel() == 0 for p in engine.module.parameters())  # really partitioned
    engine.eval()
    with torch.no_grad():
        logits = engine(X).logits
    meta = {"dp_world_size": world, "zero_stage": 3, "precision": "fp32", "tokens": 0}
    CheckpointManager(run_dir, keep_last=1).save(engine, 3, {"megamor": {"step": 3}}, to_yaml(cfg), meta)
    if rank == 0:
        torch.save(logits, Path(run_dir) / "engine_logits.pt")


@torch.no_grad()
def test_zero3_checkpoint_consolidates_to_identical_logits(tmp_path):
    run_dir = tmp_path / "zero3"
    run_distributed(_train_zero3_and_save, world_size=2, args=(str(run_dir),))
    engine_logits = torch.load(run_dir / "engine_logits.pt")
    model, cfg = load_model_from_run(run_dir)
    assert cfg.router.type == "expert_choice"
    assert torch.equal(model(X).logits, engine_logits)
    export_cli(run_dir, tmp_path / "export", tmp_path)
    exported, _ = load_exported(tmp_path / "export")
    assert torch.equal(exported(X).logits, engine_logits)
