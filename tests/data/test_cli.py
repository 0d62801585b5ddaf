"""The data_prep entry points as real subprocesses: the demo pipeline and clean error exits."""

from __future__ import annotations

import json
import sys
import time

from megamor.data.dataset import ShardSet

from .conftest import run_tool


def test_demo_pipeline_end_to_end(tmp_path):
    t0 = time.time()
    corpus, tok, shards = tmp_path / "demo_corpus.jsonl", tmp_path / "tokenizer", tmp_path / "shards"
    run_tool("make_demo_corpus.py", "--out", str(corpus), "--mb", "1")
    run_tool("train_tokenizer.py", str(corpus), "--out", str(tok), "--vocab-size", "1024")
    p = run_tool("tokenize_and_shard.py", str(corpus), "--tokenizer", str(tok), "--out", str(shards), "--workers", "2",
                 "--unit-mb", "0.25", "--valid-fraction", "0.02")
    assert "train:" in p.stderr and "MB/s" in p.stderr
    assert "OK" in run_tool("verify_shards.py", str(shards)).stdout
    assert time.time() - t0 < 60
    info = json.loads((tok / "tokenizer_info.json").read_text())
    ss = ShardSet(shards, "train")
    assert ss.tokenizer["hash"] == info["content_hash"] and ss.num_tokens > 200_000


def test_errors_exit_1_with_one_line(tmp_path):
    p = run_tool("tokenize_and_shard.py", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path),
                 "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    p = run_tool("train_tokenizer.py", str(bad), "--out", str(tmp_path / "t"), "--vocab-size", "300", check=False)
    assert p.returncode == 1 and f"{bad}:2: not JSON" in p.stderr and "Traceback" not in p.stderr
    p = run_tool("merge_shards.py", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 1 and "no plan" in p.stderr
    p = run_tool("train_tokenizer.py", "hf:someone/uncached-corpus", "--out", str(tmp_path / "h"), check=False)
    assert p.returncode == 1 and "hf:someone/uncached-corpus: cannot load" in p.stderr and "offline" in p.stderr


def test_slurm_array_script_tasks_then_merge(tmp_path, small_books):
    """slurm/tokenize_array.sbatch as SLURM runs it (array tasks, then merge) equals one run."""
    import os
    import subprocess

    from megamor.data.demo_corpus import write_demo_corpus
    from megamor.data.tokenizer_train import train_tokenizer

    from .conftest import REPO, outputs

    write_demo_corpus(tmp_path / "demo.jsonl", seed=2, target_bytes=300_000)
    inputs = [small_books[1], str(tmp_path / "demo.jsonl")]
    tok = train_tokenizer(inputs, tmp_path / "tok", vocab_size=800, num_threads=2)
    args = [*inputs, "--tokenizer", str(tok.path), "--out", str(tmp_path / "arr"), "--unit-mb", "0.1"]
    script = str(REPO / "slurm" / "tokenize_array.sbatch")
    env = {**os.environ, "PYTHON": sys.executable, "MEGAMOR_ROOT": str(REPO), "NUM_TASKS": "3", "SLURM_CPUS_PER_TASK": "1"}
    for i in (1, 0, 2):
        p = subprocess.run(["bash", script, *args], env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True, text=True, check=False)
        assert p.returncode == 0 and f"task {i} of 3 done" in p.stderr, p.stderr
    p = subprocess.run(["bash", script, "merge", str(tmp_path / "arr")], env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    run_tool("tokenize_and_shard.py", *args[:-4], "--out", str(tmp_path / "single"), "--workers", "1")
    assert outputs(tmp_path / "arr") == outputs(tmp_path / "single")
    p = subprocess.run(["bash", script, "merge", str(tmp_path / "arr")], env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0  # merging a finished folder is a no-op
