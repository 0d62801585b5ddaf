"""A tiny study: two variants x one seed, a few steps each, on a slice of Tiny Shakespeare
prepared by the study itself (tokenizer + shards)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_EXPERIMENT = """\
name: tiny
model:
  vocab_size: 512
  d_model: 64
  n_heads: 4
  n_kv_heads: 2
  d_ff: 128
  max_seq_len: 256
data: {seq_len: 32}
batch: {global_batch_size: 4, micro_batch_size: 2}
optim: {lr: 3.0e-3}
schedule: {warmup_steps: 0, decay_fraction: 0.0}
trainer: {max_steps: 1, device_tflops_probe: false}
deepspeed: {zero_stage: 0, precision: fp32}
checkpoint: {every_steps: 2, keep_last: 2}
eval: {every_steps: 2, max_batches: 1, at_end: true}
logging: {every_steps: 1, progress_bar: false}
wandb: {mode: disabled}
"""

TINY_STUDY = """\
name: tiny
experiment: {experiment}
out_dir: {out}
seeds: [7]
budget: {{flops: {flops}, count: forward}}
data: {{text: [{text}], vocab_size: 512, valid_fraction: 0.05}}
variants:
  - {{name: vanilla, model_config: configs/model/33m/vanilla.yaml, overrides: [model.n_layers=4]}}
  - name: mor2
    model_config: configs/model/33m/mor_expert_2.yaml
    overrides: [model.n_layers=4]
eval: {{val_max_batches: 2, val_batch_size: 4, fewshot_tasks: [piqa], fewshot_limit: 4}}
"""


# The same study at two budgets; the bigger one trains a wider model and only some variants.
TINY_BUDGETS = """\
budgets:
  - {{name: small, flops: {flops}}}
  - {{name: big, flops: {big}, overrides: [model.d_model=96, model.d_ff=192], variants: [vanilla, mor2]}}
"""


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, tinyshakespeare) -> Path:
    d = tmp_path_factory.mktemp("tiny_text")
    (d / "shakespeare.raw").write_text(tinyshakespeare.read_text()[:300_000])  # .raw: read as text by the study
    return d / "shakespeare.raw"


def write_study(folder: Path, text: Path, flops: float = 4.0e9, budgets: float | None = None,
                seeds: str = "[7]") -> Path:
    """The tiny study file; `budgets`: the second budget's FLOPs, giving a `budgets:` list
    (small at `flops`, big at `budgets`) instead of the single `budget`."""
    folder.mkdir(parents=True, exist_ok=True)
    exp = folder / "tiny_experiment.yaml"
    exp.write_text(TINY_EXPERIMENT)
    path = folder / "tiny_study.yaml"
    text_ = TINY_STUDY.format(experiment=exp, out=folder / "out", text=text, flops=flops)
    text_ = text_.replace("seeds: [7]", f"seeds: {seeds}")
    if budgets is not None:
        text_ = text_.replace(f"budget: {{flops: {flops}, count: forward}}\n", TINY_BUDGETS.format(flops=flops, big=budgets))
    path.write_text(text_)
    return path
