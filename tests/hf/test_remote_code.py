"""Exported MoR models load in transformers (trust_remote_code) with megamor's logits and
greedy tokens, for every variant and KV mode."""

from __future__ import annotations

import pytest
import torch

from megamor.hf.remote_code import save_model_folder
from megamor.inference.generate import generate
from tests.inference.test_engine import CASES, _model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("variant,kv", [c for c in CASES if c[0] != "vanilla"])
@torch.no_grad()
def test_hf_loaded_mor_equals_megamor(variant, kv, tmp_path):
    ours = _model(variant, kv)
    save_model_folder(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__module__.startswith("transformers_modules")  # megamor's code, run by transformers
    x = torch.randint(1, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    a = ours(x, causal_routing=True).logits
    assert (hf(x).logits - a).abs().max().item() <= 1e-5
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :15] = False  # left padding, as generate() batches prompts
    a = ours(x, attention_mask=mask, causal_routing=True).logits
    b = hf(x, attention_mask=mask.long()).logits
    assert (a[mask] - b[mask]).abs().max().item() <= 1e-5
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = generate(ours, [prompt], 10).tokens[0]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, attention_mask=torch.ones(1, 7, dtype=torch.long))
    assert got[0, len(prompt):].tolist() == want
    # A left-padded batch (as a tokenizer pads for generation): each row as megamor alone.
    short = [3, 4, 5]
    ids = torch.tensor([[0] * (len(prompt) - len(short)) + short, prompt])
    mask = (torch.arange(len(prompt)) >= len(prompt) - len(short)).long().unsqueeze(0)
    mask = torch.cat([mask, torch.ones(1, len(prompt), dtype=torch.long)])
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got[0, len(prompt):].tolist() == generate(ours, [short], 6).tokens[0]
    assert got[1, len(prompt):].tolist() == want[:6]


@torch.no_grad()
def test_export_cli_writes_a_transformers_folder(tmp_path):
    """`python -m megamor.export RUN` on a run folder: the MoR folder loads with
    AutoModelForCausalLM(trust_remote_code=True) and the modeling files never import megamor."""
    import os
    import subprocess
    import sys

    from megamor.env import repo_root
    from megamor.runs.save import CheckpointManager
    from megamor.train.config import ExperimentConfig, to_yaml
    from tests.eval.test_checkpoint import Zero0Engine

    ours = _model("mor_token", "shared")
    run = tmp_path / "runs" / "exp"
    exp = ExperimentConfig(name="exp", run_dir=str(run), model=ours.cfg)
    exp.data.seq_len, exp.data.train, exp.trainer.max_steps = 64, [str(tmp_path)], 10
    CheckpointManager(run, keep_last=2).save(Zero0Engine(ours), 10, {}, to_yaml(exp), {"tokens": 10, "zero_stage": 0, "dp_size": 1})
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "megamor.export", str(run), "--out", str(out)], cwd=repo_root(),
                       capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(repo_root())})
    assert r.returncode == 0, r.stderr
    for name in ("modeling_megamor.py", "configuration_megamor.py", "routing.py"):
        assert "megamor." not in "".join(line for line in (out / name).read_text().splitlines(True)
                                         if line.startswith(("import", "from")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (hf(x).logits - ours(x, causal_routing=True).logits).abs().max().item() <= 1e-5
    assert hf.config.num_hidden_layers == ours.cfg.n_layers and hf.config.megamor["router"]["type"] == "token_choice"


@torch.no_grad()
def test_an_export_written_before_the_routing_module_still_loads(tmp_path):
    """Exports from before routing.py shipped carry their own modeling file (kept here as it
    was, tests/hf/data/*_2026_12.py) and no `routing` in config.json: transformers still loads
    them, and they still give the refactored megamor's logits."""
    import json
    import shutil
    from pathlib import Path

    data = Path(__file__).parent / "data"
    for variant, kv in (("mor_expert", "recursion_wise"), ("mor_token", "shared")):
        ours = _model(variant, kv)
        out = save_model_folder(ours, tmp_path / variant)
        (out / "routing.py").unlink()
        for name in ("modeling_megamor.py", "configuration_megamor.py"):
            shutil.copyfile(data / name.replace(".py", "_2026_12.py"), out / name)
        cfg = json.loads((out / "config.json").read_text())
        del cfg["routing"]
        (out / "config.json").write_text(json.dumps(cfg))
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        assert not hasattr(hf, "routing")  # the old file's own routing code ran
        x = torch.randint(1, 200, (2, 30), generator=torch.Generator().manual_seed(1))
        assert (hf(x).logits - ours(x, causal_routing=True).logits).abs().max().item() <= 1e-5
