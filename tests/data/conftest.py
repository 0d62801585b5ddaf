"""Fixtures for the data tests: a real tokenizer and real shard sets built from the shared corpora."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamor.env import repo_root, shared_data_dir

REPO = repo_root()


def _data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d} (set MEGAMOR_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def shared() -> Path:
    return _data()


@pytest.fixture(scope="session")
def small_books(shared: Path) -> list[str]:
    """About 2.1 MB of real text: tinyshakespeare and Frankenstein (UTF-8 with BOM and CRLF)."""
    return [str(shared / "tinyshakespeare" / "input.txt"), str(shared / "gutenberg" / "84-0.txt")]


@pytest.fixture(scope="session")
def all_books(shared: Path) -> list[str]:
    return sorted(str(p) for p in (shared / "gutenberg").glob("*.txt")) + [str(shared / "tinyshakespeare" / "input.txt")]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_books) -> Path:
    """A real BPE sentencepiece model, vocab 2000, trained on small_books."""
    from megamor.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(small_books, out, vocab_size=2000, num_threads=2)
    return out


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, small_books) -> Path:
    """A real Hugging Face byte-level BPE (tokenizer.json + configs), vocab 1000, trained on small_books."""
    from megamor.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("hf_tokenizer")
    train_tokenizer(small_books, out, vocab_size=1000, kind="hf-bpe")
    return out


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, shared, tokenizer_dir) -> Path:
    """tinyshakespeare as paragraph documents, small shards (so windows cross shard boundaries)."""
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    out = tmp_path_factory.mktemp("shakespeare_shards")
    tokenize_and_shard([str(shared / "tinyshakespeare" / "input.txt")], out, tokenizer_dir,
                       ShardSettings(shard_tokens=40_000, valid_fraction=0.05), progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def frankenstein_shards(tmp_path_factory, shared, tokenizer_dir) -> Path:
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    out = tmp_path_factory.mktemp("frankenstein_shards")
    tokenize_and_shard([str(shared / "gutenberg" / "84-0.txt")], out, tokenizer_dir,
                       ShardSettings(shard_tokens=30_000, valid_fraction=0.05), progress=False, log=lambda m: None)
    return out


def run_tool(script: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a data_prep entry point in a real subprocess."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "data_prep" / script), *args], capture_output=True, text=True,
                       env=env, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def outputs(folder: Path) -> dict[str, bytes]:
    """The output of a tokenize_and_shard run: shards, document indexes and the manifest."""
    files = sorted(folder.glob("*.npy")) + [folder / "manifest.json"]
    return {p.name: p.read_bytes() for p in files}
