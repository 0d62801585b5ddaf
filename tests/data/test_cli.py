"""The data_prep entry points as real subprocesses: the demo pipeline and clean error exits."""

from __future__ import annotations

import json
import sys
import time

import pytest

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


def test_errors_exit_2_with_one_line(tmp_path):
    p = run_tool("tokenize_and_shard.py", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path),
                 "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    p = run_tool("train_tokenizer.py", str(bad), "--out", str(tmp_path / "t"), "--vocab-size", "300", check=False)
    assert p.returncode == 2 and f"{bad}:2: not JSON" in p.stderr and "Traceback" not in p.stderr
    p = run_tool("merge_shards.py", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 2 and "no plan" in p.stderr
    p = run_tool("train_tokenizer.py", "hf:someone/uncached-corpus", "--out", str(tmp_path / "h"), check=False)
    assert p.returncode == 2 and "hf:someone/uncached-corpus: cannot load" in p.stderr and "offline" in p.stderr


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


def test_truncated_gz_input_is_one_line_naming_file_and_line(tmp_path, tokenizer_dir):
    import gzip

    rows = "".join(json.dumps({"text": f"line {i} " * 8}) + "\n" for i in range(20_000)).encode()
    whole = gzip.compress(rows)
    p = tmp_path / "corpus.jsonl.gz"
    p.write_bytes(whole[: len(whole) // 2])
    for tool, extra in (("train_tokenizer.py", ["--out", str(tmp_path / "tok"), "--vocab-size", "300"]),
                        ("tokenize_and_shard.py", ["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "sh"),
                                                   "--workers", "1", "--no-progress"])):
        r = run_tool(tool, str(p), *extra, check=False)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "EOFError" not in r.stderr
        err = [line for line in r.stderr.splitlines() if line.startswith(f"{tool}: error:")]
        assert len(err) == 1 and err[0].startswith(f"{tool}: error: {p}:") and "gz stream is truncated" in err[0], r.stderr


def test_valid_files_flag(tmp_path, tokenizer_dir):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first book.\n\nits second paragraph.\n")
    b.write_text("held-out book.\n\nmore of it.\n")
    out = tmp_path / "sh"
    run_tool("tokenize_and_shard.py", str(a), str(b), "--tokenizer", str(tokenizer_dir), "--out", str(out),
             "--txt-mode", "file", "--valid-files", str(b), "--workers", "1", "--no-progress")
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["valid"]["documents"] == 1
    r = run_tool("tokenize_and_shard.py", str(a), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x"),
                 "--valid-files", str(b), "--no-progress", check=False)
    assert r.returncode == 2 and f"--valid-files: {b} is not one of the inputs" in r.stderr
    r = run_tool("tokenize_and_shard.py", str(a), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "y"),
                 "--valid-files", str(a), "--valid-fraction", "0.1", check=False)
    assert r.returncode == 2 and "not both" in r.stderr


@pytest.mark.launch
def test_slurm_array_submit_takes_sbatch_options(slurm_cluster, tmp_path, small_books, tokenizer_dir):
    """`submit N OPTIONS -- ARGS`: the options reach sbatch for the array and the merge job (the
    script's own --cpus-per-task=16 fits no node of the local cluster's 2 CPUs)."""
    import subprocess

    from .conftest import REPO

    out = tmp_path / "arr"
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")}
    p = subprocess.run(["bash", "slurm/tokenize_array.sbatch", "submit", "2", "--cpus-per-task=1", "--partition=high",
                        "--", small_books[0], "--tokenizer", str(tokenizer_dir), "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    array, merge = int(p.stdout.split("submitted array ")[1].split()[0]), int(p.stdout.split("merge job ")[1].split(";")[0])
    assert slurm_cluster.job_state(array).get("CPUs/Task") == "1", p.stdout  # not the script's 16: it would never start
    state = slurm_cluster.wait(merge, timeout=240)
    logs = "\n".join(f.read_text() for f in sorted((tmp_path / "logs").glob("*.out")))
    assert state == "COMPLETED", logs
    assert slurm_cluster.job_state(merge)["Partition"] == "high"
    assert "task 0 of 2 done" in logs and "task 1 of 2 done" in logs and (out / "manifest.json").is_file()
