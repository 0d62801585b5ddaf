"""Fixtures for training tests: a tiny tokenized corpus and a tiny MoR experiment config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megamor.env import repo_root

# Tiny MoR: expert choice, middle-cycle, 2 recursions, activation checkpointing on, fp32.
TINY_YAML = """\
name: tiny
model:
  vocab_size: 512
  d_model: 64
  n_layers: 4
  n_heads: 4
  n_kv_heads: 2
  d_ff: 128
  max_seq_len: 64
  sharing: middle_cycle
  num_recursions: 2
  router: {{type: expert_choice}}
data:
  train: [{shards}]
  valid: [{shards}]
  seq_len: 32
batch: {{global_batch_size: 8, micro_batch_size: 2}}
optim: {{lr: 3.0e-3}}
trainer: {{max_steps: 20, activation_checkpointing: true, device_tflops_probe: false}}
deepspeed:
  zero_stage: 1
  precision: fp32
  config: {{zero_optimization: {{stage3_param_persistence_threshold: 0}}}}  # ZeRO-3 partitions even tiny tensors
checkpoint: {{every_steps: 5, keep_last: 2}}
eval: {{every_steps: 0, max_batches: 2, at_end: true}}
logging: {{every_steps: 1, progress_bar: false}}
wandb: {{mode: disabled}}
"""


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tinyshakespeare) -> Path:
    """Tokenizer (vocab 512) + shards of Tiny Shakespeare, made by the data_prep CLIs (~2 s)."""
    src = tinyshakespeare
    d = tmp_path_factory.mktemp("tiny_data")
    py, root = sys.executable, repo_root()
    subprocess.run([py, "data_prep/train_tokenizer.py", str(src), "--out", str(d / "tok"), "--vocab-size", "512",
                    "--txt-mode", "paragraph"], cwd=root, check=True, capture_output=True)
    subprocess.run([py, "data_prep/tokenize_and_shard.py", str(src), "--tokenizer", str(d / "tok"), "--out",
                    str(d / "shards"), "--workers", "1", "--txt-mode", "paragraph", "--valid-fraction", "0.05",
                    "--no-progress"], cwd=root, check=True, capture_output=True)
    return d


@pytest.fixture(scope="session")
def tiny_config(tiny_data) -> Path:
    path = tiny_data / "tiny.yaml"
    path.write_text(TINY_YAML.format(shards=tiny_data / "shards"))
    return path
