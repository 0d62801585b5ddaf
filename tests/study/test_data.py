"""A study prepares its raw text with either tokenizer kind (issue 30.1: every place that
trains a tokenizer takes a Hugging Face one too)."""

from __future__ import annotations

import json

from megamor.data.tokenizer import load_tokenizer
from megamor.study.config import load_study
from megamor.study.data import is_prepared, prepare
from tests.study.conftest import write_study


def test_hf_bpe_study_data_trains_a_byte_level_bpe_and_shards_with_it(tiny_text, tmp_path):
    path = write_study(tmp_path, tiny_text)
    study = load_study(path, ["data.tokenizer_kind=hf-bpe", "data.vocab_size=384"])
    assert not is_prepared(study)
    shards, tok_dir = prepare(study)
    assert (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer.model").exists()
    assert is_prepared(study)
    tok = load_tokenizer(tok_dir)
    assert tok.kind == "hf" and tok.vocab_size == 384
    text = "To be, or not to be"
    assert tok.decode(tok.encode(text)) == text  # byte-level: round trip exact
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["hash"] == tok.info()["hash"] and manifest["tokenizer"]["kind"] == "hf"  # shards name their tokenizer
    # Prepared once: a second call trains nothing (the files keep their times).
    before = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    prepare(study)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == before
