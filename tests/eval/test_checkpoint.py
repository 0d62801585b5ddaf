"""Checkpoint loading: consolidated files, run folders, HF exports, wrapper prefixes, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megamor.runs.find import find_tokenizer, list_checkpoints
from megamor.runs.layout import CheckpointError
from megamor.runs.load import load_model, load_model_and_meta


def same_logits(a, b):
    x = torch.randint(0, a.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x, causal_routing=True).logits, b(x, causal_routing=True).logits)


def test_consolidated_file_roundtrip(mor_model, mor_checkpoint):
    model, meta = load_model_and_meta(mor_checkpoint)
    assert not model.training and meta["step"] == 40
    assert same_logits(model, mor_model)
    assert load_model(mor_model) is mor_model


def test_prefixed_state_dict_and_experiment_config(mor_model, tmp_path):
    sd = {"module." + k: v for k, v in mor_model.state_dict().items() if k != "lm_head.weight"}  # tied head omitted
    p = tmp_path / "step_000120.pt"
    torch.save({"model": sd, "config": {"model": dataclasses.asdict(mor_model.cfg), "train": {}}}, p)
    model, meta = load_model_and_meta(p)
    assert meta["step"] == 120 and same_logits(model, mor_model)


def test_run_folder_lists_checkpoints_by_step(mor_model, tmp_path, spm_path):
    run = tmp_path / "run1"
    (run / "checkpoints").mkdir(parents=True)
    cfg = dataclasses.asdict(mor_model.cfg)
    for step in (200, 50, 1000):
        torch.save({"model": mor_model.state_dict(), "config": cfg, "meta": {"step": step, "tokens": step * 1024}}, run / "checkpoints" / f"ckpt-{step}.pt")
    (run / "tokenizer.model").write_bytes(spm_path.read_bytes())
    cks = list_checkpoints(run)
    assert [c.step for c in cks] == [50, 200, 1000] and cks[0].meta["tokens"] == 50 * 1024
    _, meta = load_model_and_meta(run)  # a run folder means its newest checkpoint
    assert meta["step"] == 1000
    assert find_tokenizer(cks[0]) == run / "tokenizer.model"


class Zero0Engine:
    """Stands in for a DeepSpeed engine at ZeRO-0: writes the model-states file of DeepSpeed's
    layout (`<tag>/mp_rank_00_model_states.pt` with the state dict under "module")."""

    def __init__(self, model):
        self.module = model

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), **client_state}, d / "mp_rank_00_model_states.pt")


def training_run(tmp_path, model, spm_path, steps=(100, 200), tokenizer_hash: str | None = None) -> Path:
    """A run folder as the trainer writes it (megamor.runs.save.CheckpointManager); with
    `tokenizer_hash`, each tag's trainer_state.pt records it as the trainer does."""
    from megamor.runs.layout import TRAINER_STATE
    from megamor.runs.save import CheckpointManager
    from megamor.train.config import ExperimentConfig, to_yaml

    run = tmp_path / "runs" / "exp1"
    exp = ExperimentConfig(name="exp1", run_dir=str(run), model=model.cfg)
    exp.data.seq_len = 128
    exp.data.train = [str(tmp_path)]  # never read: evaluation only needs the model config
    exp.trainer.max_steps = 200
    exp.data.tokenizer = str(spm_path)
    mgr = CheckpointManager(run, keep_last=5)
    for step in steps:
        state = {TRAINER_STATE: {"step": step, "tokenizer_hash": tokenizer_hash}} if tokenizer_hash else None
        mgr.save(Zero0Engine(model), step, {}, to_yaml(exp), {"tokens": step * 1024, "zero_stage": 0, "dp_size": 1}, state)
    return run


def test_deepspeed_run_folder(tmp_path, mor_model, spm_path):
    run = training_run(tmp_path, mor_model, spm_path)
    cks = list_checkpoints(run)
    assert [(c.kind, c.step, c.meta["tokens"]) for c in cks] == [("deepspeed", 100, 102400), ("deepspeed", 200, 204800)]
    model, meta = load_model_and_meta(run)  # the newest complete tag
    assert meta["step"] == 200 and meta["tokens"] == 204800 and same_logits(model, mor_model)
    assert find_tokenizer(cks[0]) == spm_path  # from the run's experiment.yaml

    # after `python -m megamor.export`, the export of a step is preferred over its DeepSpeed tag
    from megamor.export import export

    out = export(run)
    assert out == run / "export" / "step_00000200"
    cks = list_checkpoints(run)
    assert [(c.kind, c.step) for c in cks] == [("deepspeed", 100), ("export", 200)]
    model, meta = load_model_and_meta(cks[-1])
    assert meta["step"] == 200 and same_logits(model, mor_model)


def test_run_folder_without_complete_checkpoint(tmp_path, mor_model, spm_path):
    run = training_run(tmp_path, mor_model, spm_path, steps=(100,))
    tag = run / "checkpoints" / "step_00000100"
    (tag / "COMPLETE").unlink()  # a save cut short: the marker is written last
    with pytest.raises(CheckpointError, match=r"exp1: no complete checkpoint to evaluate; incomplete DeepSpeed tags .*: step_00000100"):
        list_checkpoints(run)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(run)
    with pytest.raises(CheckpointError, match="incomplete DeepSpeed checkpoint"):
        load_model(tag)
    with pytest.raises(CheckpointError, match="run folder not found"):
        list_checkpoints(tmp_path / "missing")


def test_bad_files(tmp_path, mor_model):
    p = tmp_path / "x.pt"
    torch.save({"state": 1}, p)
    with pytest.raises(CheckpointError, match="not a consolidated megamor checkpoint"):
        load_model(p)
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read as a torch checkpoint"):
        load_model(p)
    cfg = dataclasses.asdict(mor_model.cfg)
    cfg["d_model"] = 32
    torch.save({"model": mor_model.state_dict(), "config": cfg}, p)
    with pytest.raises(CheckpointError, match=r"x.pt: state dict does not match the config: .*size mismatch"):
        load_model(p)
    cfg = dataclasses.asdict(mor_model.cfg)
    cfg["sharing"] = "bogus"
    torch.save({"model": mor_model.state_dict(), "config": cfg}, p)
    with pytest.raises(Exception, match=r"config\.sharing"):
        load_model(p)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")


def test_hf_export_of_a_vanilla_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    import pathlib
    import sys

    from megamor.model import MoRLM
    from megamor.model.hf import llama_config, to_llama_state_dict

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from conftest import small_config

    torch.manual_seed(1)
    m = MoRLM(small_config(sharing="none", num_recursions=1, router=type(small_config().router)()))
    hf = transformers.LlamaForCausalLM(llama_config(m.cfg))
    hf.load_state_dict(to_llama_state_dict(m.cfg, m.state_dict()), strict=False)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert same_logits(loaded, m)


def test_mor_export_folder_without_consolidated_file(tmp_path, mor_model, spm_path):
    """An export folder's safetensors + config.json alone (megamor.pt deleted) still loads."""
    from megamor.export import export

    out = export(training_run(tmp_path, mor_model, spm_path, steps=(100,)))
    (out / "megamor.pt").unlink()
    model, meta = load_model_and_meta(out)
    assert meta["step"] == 100 and same_logits(model, mor_model)
