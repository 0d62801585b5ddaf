"""The data_prep entry points as real subprocesses: the demo pipeline and clean error exits."""

from __future__ import annotations

import json
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
