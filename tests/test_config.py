"""megamor.config: every structural mistake reported (nested did-you-mean, list for a section),
unreadable files named in one line, renamed and retired keys (on the real experiment schema)."""

from __future__ import annotations

import pytest

from megamor.config import ConfigError, ConfigErrors, ConfigFileError, error_lines
from megamor.train.config import load_experiment

OK = ["data.train=[x]", "trainer.max_steps=10"]  # the two keys an experiment must set


def test_nested_unknown_keys_get_a_suggestion_at_every_depth():
    for override, hint in (("sed=1", "did you mean seed?"), ("model.routr=1", "did you mean model.router?"),
                           ("model.router.tpye=x", "did you mean model.router.type?"),
                           ("trainer.profile.step=[1,2]", "did you mean trainer.profile.steps?")):
        with pytest.raises(ConfigError) as e:
            load_experiment([], [*OK, override])
        assert e.value.key == override.partition("=")[0] and hint in str(e.value), str(e.value)


def test_a_yaml_with_several_mistakes_reports_every_one(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("bogus: 1\nmodel:\n  routr: 2\n  d_model: abc\n  router: [1, 2]\ntrainer:\n  max_stepz: 3\n"
                 "  max_steps: zz\ndata: {train: [x]}\n")
    with pytest.raises(ConfigErrors) as e:
        load_experiment([f])
    keys = [x.key for x in e.value.errors]
    assert sorted(keys) == sorted(["bogus", "model.routr", "model.d_model", "model.router", "trainer.max_stepz",
                                   "trainer.max_steps"]), keys
    lines = error_lines(e.value)
    assert len(lines) == 6 and all(line.startswith("config key '") and "\n" not in line for line in lines)


@pytest.mark.parametrize("override, key", [
    ("model.router=[1,2]", "model.router"),  # a list where a section belongs
    ("trainer.profile=[1]", "trainer.profile"),
    ("optim=5", "optim"),
    ("optim.betas={a: 1}", "optim.betas"),  # a section where a list belongs
    ("name=[a]", "name"),  # a list where one value belongs
    ("deepspeed.config=[1]", "deepspeed.config"),  # a list where a free-form mapping belongs (was a TypeError)
])
def test_a_list_or_value_in_the_wrong_place_names_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_experiment([], [*OK, override])
    assert e.value.key == key and "?" not in e.value.key, str(e.value)


def test_a_list_over_a_section_from_a_file_names_the_key(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("trainer: {max_steps: 3}\n")
    b.write_text("trainer: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_experiment([a, b])
    assert e.value.key == "trainer" and str(b) in str(e.value)


def test_a_config_file_that_is_not_utf8_or_is_a_folder_is_named(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigFileError, match=r"latin1.yaml: is not UTF-8 text \(byte 0xe9 on line 1\)"):
        load_experiment([f], OK)
    with pytest.raises(ConfigFileError, match="is a directory"):
        load_experiment([tmp_path], OK)


def test_renamed_cadence_key_still_loads_with_one_note(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("logging: {log_every: 7}\n")
    cfg = load_experiment([f], OK)
    assert cfg.logging.every_steps == 7
    assert "logging.log_every' is deprecated: read as 'logging.every_steps'" in capsys.readouterr().err
    assert load_experiment([f], [*OK, "logging.log_every=3"]).logging.every_steps == 3  # an override still wins
    assert load_experiment([f], [*OK, "logging.every_steps=4"]).logging.every_steps == 4
    both = tmp_path / "both.yaml"
    both.write_text("logging: {log_every: 7, every_steps: 8}\n")
    with pytest.raises(ConfigError, match="set too: keep one"):
        load_experiment([both], OK)


def test_retired_attn_impl_still_loads_with_one_note(capsys):
    import megamor.config

    megamor.config._noted.clear()
    cfg = load_experiment([], [*OK, "model.attn_impl=sdpa"])
    assert not hasattr(cfg.model, "attn_impl")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.attn_impl' is deprecated and ignored" in err


def test_missing_model_config_names_each_folder_once(tmp_path, monkeypatch):
    from megamor.env import repo_root

    monkeypatch.chdir(repo_root())
    with pytest.raises(ConfigError) as e:
        load_experiment([], [*OK, "model_config=configs/model/nope.yaml"])
    assert e.value.key == "model_config" and str(e.value).count(str(repo_root())) == 1, str(e.value)


def test_mistakes_inside_a_list_of_sections_name_the_item(tmp_path):
    from megamor.config import load_config
    from megamor.study.config import StudyConfig

    f = tmp_path / "study.yaml"
    f.write_text("name: s\nexperiment: e.yaml\nvariants:\n  - {nme: x, model_config: a.yaml}\n  - [1, 2]\n")
    with pytest.raises(ConfigErrors) as e:
        load_config(StudyConfig, f)
    assert [x.key for x in e.value.errors] == ["variants[0].nme", "variants[1]"]
    assert "did you mean variants[0].name?" in str(e.value)


def test_whole_numbers_in_scientific_notation_fill_int_keys(tmp_path):
    """`max_tokens: 5e9` (YAML reads it as a float) and `trainer.max_tokens=1e6` are budgets as
    researchers write them; a fraction for an int key is still refused, naming the key."""
    f = tmp_path / "e.yaml"
    f.write_text("trainer:\n  max_tokens: 5e9\n")
    cfg = load_experiment([f], ["data.train=[x]", "batch.global_batch_size=1.024e3"])
    assert cfg.trainer.max_tokens == 5_000_000_000 and isinstance(cfg.trainer.max_tokens, int)
    assert cfg.batch.global_batch_size == 1024
    assert load_experiment([], ["data.train=[x]", "trainer.max_tokens=1e6"]).trainer.max_tokens == 1_000_000
    with pytest.raises(ConfigError) as e:
        load_experiment([], ["data.train=[x]", "trainer.max_tokens=1.5"])
    assert e.value.key == "trainer.max_tokens"
