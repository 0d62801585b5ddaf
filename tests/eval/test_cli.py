"""The entry points in evals/ end to end (in-process; each is argparse + a call into megamor.eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lm_eval.evaluator
import pytest
import torch

from megamor.data.tokenizer import TokenizerMismatchError
from megamor.env import repo_root
from megamor.testing.scripts import load_evals_script

load = load_evals_script


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


def run_entry(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    return subprocess.run([sys.executable, str(repo_root() / "evals" / f"{name}.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_perplexity_bad_text_is_one_line_exit_2(mor_checkpoint, spm_path, tmp_path):
    """An empty file is not "perplexity 1.0 over 0 tokens"; non-UTF-8 bytes are not a traceback."""
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("")
    latin.write_bytes(b"ok\nna\xefve\n")
    for path, message in ((empty, f"perplexity.py: error: {empty}: no text to evaluate"),
                          (latin, f"perplexity.py: error: {latin}:2: not valid utf-8 at byte offset 5")):
        r = run_entry("perplexity", "--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--text", str(path))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[0]] and r.stderr.startswith(message), r.stderr


def test_perplexity_context_defaults_to_the_models_max_seq_len(mor_model, spm_path, tmp_path):
    """Not the training data.seq_len (issue 27): few-shot requests are longer than training windows."""
    from megamor.export import export

    from .test_checkpoint import training_run

    run = training_run(tmp_path, mor_model, spm_path)  # trained at data.seq_len 128; model max_seq_len 256
    assert mor_model.cfg.max_seq_len == 256
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    ppl = load("perplexity")
    for source in (run, export(run)):
        out = ppl.main(["--checkpoint", str(source), "--tokenizer", str(spm_path), "--text", str(text), "--no-progress"])
        assert out["perplexity"]["max_length"] == 256 and out["meta"]["context_from"] == "model.max_seq_len"
    out = ppl.main(["--checkpoint", str(run), "--tokenizer", str(spm_path), "--text", str(text), "--no-progress",
                    "--max-length", "64"])
    assert out["perplexity"]["max_length"] == 64


def test_output_folders_are_created(mor_checkpoint, spm_path, tmp_path, data_dir):
    deep = tmp_path / "not" / "yet"
    load("depth").main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--text", "The cat sat.",
                        "--quiet", "--html", str(deep / "h" / "x.html"), "--json", str(deep / "j" / "s.json"),
                        "--plots", str(deep / "p")])
    assert (deep / "h" / "x.html").is_file() and (deep / "j" / "s.json").is_file() and (deep / "p").is_dir()
    load("fewshot").main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--tasks", "arc_easy",
                          "--limit", "2", "--data-dir", str(data_dir), "--out", str(deep / "f" / "r.json"), "--no-progress"])
    assert (deep / "f" / "r.json").is_file() and (deep / "f" / "r.md").is_file()
    text = tmp_path / "t.txt"
    text.write_text("Some words to score.")
    load("perplexity").main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--text", str(text),
                             "--out", str(deep / "ppl" / "p.json"), "--no-progress"])
    assert (deep / "ppl" / "p.json").is_file()


def test_perplexity_reads_tokenize_and_shard_valid_shards_by_default(mor_checkpoint, spm_path, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "valid-00000.npy", rng.integers(4, 200, 300).astype(np.uint16))  # as data_prep names them
    np.save(tmp_path / "valid-00000.docs.npy", np.array([0], dtype=np.int64))
    args = ["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--shards", str(tmp_path), "--no-progress"]
    with pytest.raises(TokenizerMismatchError, match=r"no readable manifest\.json"):  # bare arrays: tokenizer unknown
        load("perplexity").main(args)
    res = load("perplexity").main([*args, "--allow-tokenizer-mismatch"])["perplexity"]
    assert res["tokens"] == 300


def test_perplexity_json_on_stdout_is_clean_and_a_larger_tokenizer_is_one_line(mor_model, spm_path, tmp_path):
    """`perplexity.py ... > out.json` is valid JSON (library lines go to stderr); a tokenizer with
    more tokens than the model's vocabulary is one `perplexity.py: error:` line, exit 2."""
    import dataclasses

    import torch

    from .test_checkpoint import training_run

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    run = training_run(tmp_path, mor_model, spm_path, steps=(100,))  # a run folder: its DeepSpeed tag loads DeepSpeed
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # as a user runs it: DeepSpeed says what it picked
    r = subprocess.run([sys.executable, str(repo_root() / "evals" / "perplexity.py"), "--checkpoint", str(run), "--tokenizer",
                        str(spm_path), "--text", str(text), "--no-progress"], capture_output=True, text=True, timeout=300,
                       env={**env, "PYTHONPATH": str(repo_root())}, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"]["tokens"] > 0
    small = tmp_path / "small.pt"
    cfg = dataclasses.replace(mor_model.cfg, vocab_size=64)
    from megamor.model import MoRLM

    torch.save({"model": MoRLM(cfg).state_dict(), "config": dataclasses.asdict(cfg)}, small)
    r = run_entry("perplexity", "--checkpoint", str(small), "--tokenizer", str(spm_path), "--text", str(text))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("perplexity.py: error: the tokenizer has") and "the model only 64" in lines[0]


@pytest.mark.parametrize("name,args,message", [
    ("fewshot", ["--tasks", "openbookqa", "--limit", "2", "--num-fewshot", "600"], "openbookqa: 600-shot needs 600 examples"),
    ("fewshot", ["--tasks", "piqa", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ("fewshot", ["--tasks", "piqa", "--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0, got -1"),
    ("fewshot", ["--tasks", "piqa", "--device", "cuda"], "--device cuda: this torch"),
    ("perplexity", ["--text", "{text}", "--stride", "0"], "argument --stride: must be >= 1, got 0"),
    ("perplexity", ["--text", "{text}", "--max-length", "16", "--stride", "32"], "--stride 32: must be in [1, max length 16]"),
    ("perplexity", ["--text", "{text}", "--max-tokens", "8"], "--max-tokens applies to --shards only"),  # was ignored
    ("depth", ["--text", ""], "--text: an empty text"),
])
def test_eval_bad_arguments_are_one_line_exit_2(name, args, message, mor_checkpoint, spm_path, tmp_path, data_dir):
    """Bad numbers, a missing CUDA device, a k-shot larger than the pool: `TOOL.py: error:` and
    exit 2, never a traceback (and never a silent fallback: --limit 0 scored nan, -1 dropped an
    example, --num-fewshot -1 ran zero-shot)."""
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a CUDA device is present")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    extra = ["--data-dir", str(data_dir)] if name == "fewshot" else []
    r = run_entry(name, "--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), *extra,
                  *[a.replace("{text}", str(text)) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"{name}.py: error: ") and message in lines[0], lines[0]


def test_lm_eval_unknown_task_is_one_line_exit_2(mor_checkpoint, spm_path):
    r = subprocess.run([sys.executable, str(repo_root() / "evals" / "lm_eval_megamor.py"), "--model", "megamor",
                        "--model_args", f"checkpoint={mor_checkpoint},tokenizer={spm_path}",
                        "--include_path", str(repo_root() / "evals" / "tasks"), "--tasks", "megamor_hellaswg",
                        "--limit", "2"], capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": str(repo_root())})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lm_eval_megamor.py: error: --tasks: Tasks not found") and "megamor_hellaswg" in last
