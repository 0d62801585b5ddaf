"""A study prepares its raw text with either tokenizer kind (issue 30.1: every place that
trains a tokenizer takes a Hugging Face one too)."""

from __future__ import annotations

import json

import pytest

from megamor.config import ConfigError
from megamor.data.tokenizer import load_tokenizer
from megamor.study.config import load_study
from megamor.study.data import data_paths, is_prepared, prepare
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
    from megamor.study.data import data_settings

    assert json.loads((shards.parent / "settings.json").read_text()) == data_settings(study)  # what they were made with
    prepare(study)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == before


def _fake_prepared(tmp_path, **settings):
    """A study whose OUT/data holds a (fake) tokenizer and shards, and the settings file."""
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    study = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}/out", f"data.text=[{text}]"])
    shards, tok = data_paths(study)
    shards.mkdir(parents=True)
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"model")
    (shards / "manifest.json").write_text("{}")
    if settings:
        (shards.parent / "settings.json").write_text(json.dumps({"valid_fraction": study.data.valid_fraction, **settings}))
    return study, text


def test_data_prepared_with_other_settings_are_refused_naming_the_key(tmp_path, capsys):
    """Issue: preparation was skipped whenever a tokenizer and shards existed, so a changed
    data.vocab_size (or text, valid_fraction) trained and evaluated on the old data silently."""
    from megamor.study.__main__ import main

    _, text = _fake_prepared(tmp_path, vocab_size=512)
    changed = load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}/out", f"data.text=[{text}]",
                                                             "data.vocab_size=1024"])
    with pytest.raises(ConfigError) as e:
        prepare(changed)
    assert e.value.key == "data.vocab_size" and "512" in str(e.value)
    rc = main(["configs/studies/scaling_cpu.yaml", f"out_dir={tmp_path}/out", f"data.text=[{text}]", "data.vocab_size=1024",
               "seeds=[1]", f"report_dir={tmp_path}/report", "--plan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "data.vocab_size" in err[0], err
    with pytest.raises(ConfigError, match=r"data\.valid_fraction"):
        prepare(load_study("configs/studies/scaling_cpu.yaml", [f"out_dir={tmp_path}/out", f"data.text=[{text}]",
                                                               "data.vocab_size=512", "data.valid_fraction=0.1"]))


def test_data_prepared_before_the_settings_file_are_trusted(tmp_path):
    study, _ = _fake_prepared(tmp_path)
    prepare(study)  # no settings file: trusted, nothing prepared again
    assert not (data_paths(study)[0].parent / "settings.json").exists()  # not stamped with settings it may not have had
