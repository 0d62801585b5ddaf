"""A run folder saved before router.gate_straight_through defaulted to true (its stored configs
lack the key) resumes, from the same user config, exactly as it would have continued: with the
soft gate it was trained with."""

from __future__ import annotations

import json
import shutil

import pytest

from megamor.runs import integrity
from megamor.runs.layout import CONFIG_FILE
from tests.train.helpers import assert_ok, launch

pytestmark = pytest.mark.launch


def as_saved_before_the_change(run_dir, keep_step: int) -> None:
    """Drop the newer tags and the key from every stored experiment.yaml (markers rehashed, as a
    save of that time wrote them)."""
    ckpts = run_dir / "checkpoints"
    for tag in [d for d in ckpts.iterdir() if d.is_dir()]:
        marker = tag / integrity.MARKER
        if not marker.is_file():
            continue
        meta = json.loads(marker.read_text())
        if meta["step"] > keep_step:
            shutil.rmtree(tag)
            continue
        cfg = tag / CONFIG_FILE
        cfg.write_text("".join(line for line in cfg.read_text().splitlines(keepends=True)
                               if "gate_straight_through" not in line))
        meta["files"][CONFIG_FILE] = cfg.stat().st_size
        meta["hashes"][CONFIG_FILE] = integrity.hash_file(cfg)
        marker.write_text(json.dumps(meta))
        integrity.write_latest(ckpts, tag.name)


def test_an_old_run_folder_resumes_bit_for_bit_with_its_soft_gate(tiny_config, tmp_path):
    steps = ["trainer.max_steps=10", "deepspeed.zero_stage=0"]
    ref = launch(tiny_config, tmp_path / "ref", [*steps, "model.router.gate_straight_through=false"])
    assert_ok(ref)
    old = tmp_path / "old"
    shutil.copytree(ref.run_dir, old)
    as_saved_before_the_change(old, keep_step=5)
    resumed = launch(tiny_config, old, steps)  # the tiny config does not set the key: today's default is true
    assert_ok(resumed)
    assert "gate_straight_through is false as the checkpoint to resume" in resumed.output
    got, want = resumed.losses(), ref.losses()
    assert all(got[s] == want[s] for s in range(6, 11)), (got, want)
