"""The entry points in evals/ end to end (in-process; each is argparse + a call into megamor.eval)."""

from __future__ import annotations

import importlib.util
import json
import sys

import lm_eval.evaluator
import pytest

from megamor.env import repo_root


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"evals_{name}", repo_root() / "evals" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fewshot_cli(mor_checkpoint, spm_path, tmp_path, data_dir):
    out = tmp_path / "r" / "fewshot.json"
    payload = load("fewshot").main([
        "--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--tasks", "arc_easy,lambada", "--num-fewshot", "1",
        "--limit", "6", "--data-dir", str(data_dir), "--out", str(out), "--no-progress", "--batch-size", "8",
    ])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload, default=str))
    assert data["results"]["arc_easy"]["n"] == 6 and data["results"]["arc_easy"]["num_fewshot"] == 1
    assert {"acc", "acc_norm", "acc_stderr"} <= set(data["results"]["arc_easy"]["metrics"])
    assert data["meta"]["step"] == 40
    assert "| lambada | 6 | 1 | perplexity |" in out.with_suffix(".md").read_text()


def test_fewshot_cli_bad_task_file(mor_checkpoint, spm_path, tmp_path):
    bad = tmp_path / "piqa.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\nnot json\n')
    (tmp_path / "piqa-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid JSON"):
        load("fewshot").main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--tasks", "piqa", "--task-file", f"piqa={bad}"])


def test_perplexity_cli(mor_checkpoint, spm_path, tmp_path, data_dir):
    out = tmp_path / "ppl.json"
    res = load("perplexity").main([
        "--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--text", str(data_dir / "wikitext-2-raw" / "wiki.valid.raw"),
        "--split", "wikitext", "--max-docs", "2", "--max-length", "128", "--stride", "64", "--out", str(out), "--no-progress",
    ])["perplexity"]
    assert json.loads(out.read_text())["perplexity"] == res
    assert res["docs"] == 2 and res["stride"] == 64 and res["max_length"] == 128
    assert {"token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "tokens_per_s"} <= set(res)


def test_lm_eval_command_line(mor_checkpoint, spm_path, tmp_path, monkeypatch, data_dir):
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda *a, **k: None)
    mod = load("lm_eval_megamor")
    monkeypatch.setattr(sys, "argv", [
        "lm_eval", "--model", "megamor", "--model_args", f"checkpoint={mor_checkpoint},tokenizer={spm_path}", "--batch_size", "8",
        "--include_path", str(repo_root() / "evals" / "tasks"), "--tasks", "megamor_winogrande", "--limit", "4",
        "--metadata", json.dumps({"data_dir": str(data_dir)}), "--output_path", str(tmp_path / "lm"),
    ])
    mod.cli_evaluate()
    res = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())
    assert res["results"]["megamor_winogrande"]["sample_len"] == 4 and "acc,none" in res["results"]["megamor_winogrande"]
