"""docs/config.md is what `python -m megamor.config_doc` generates from the config dataclasses:
stale means a test failure, and every key has its one line of meaning in the code."""

from __future__ import annotations

import dataclasses

from megamor.config_doc import DOC, document, main
from megamor.env import repo_root
from megamor.train.config import ExperimentConfig


def test_docs_config_md_is_current():
    text, _ = document()
    assert (repo_root() / DOC).read_text(encoding="utf-8") == text, "stale: run python -m megamor.config_doc"


def test_every_key_has_a_type_default_and_meaning():
    text, missing = document()
    assert missing == []
    for f in dataclasses.fields(ExperimentConfig):  # top-level keys; sections are checked by their keys below
        if f.default_factory is dataclasses.MISSING:
            assert f"| `{f.name}` |" in text, f.name
    for key in ("model.router.gate_straight_through", "logging.every_steps", "checkpoint.every_steps", "data.seed",
                "deepspeed.config", "variants[].model_config", "budgets[].flops"):
        assert f"| `{key}` |" in text, key
    assert "| `logging.log_every` | renamed to `logging.every_steps`" in text and "| `model.attn_impl` | ignored" in text


def test_check_flag_fails_on_a_stale_file(tmp_path):
    out = tmp_path / "config.md"
    assert main(["--out", str(out)]) == 0 and main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("| `seed` |", "| `seed_old` |"))
    assert main(["--check", "--out", str(out)]) == 1
