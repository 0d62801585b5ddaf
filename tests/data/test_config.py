"""DataConfig: value checks at load time, path checks before distributed start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from megamor.config import ConfigError, load_config
from megamor.data.config import DataConfig
from megamor.data.pipeline import ShardSettings, tokenize_and_shard
from megamor.data.tokenizer_train import train_tokenizer


@dataclass
class Experiment:
    data: DataConfig = field(default_factory=DataConfig)


def test_loads_from_yaml_with_overrides(tmp_path, shakespeare_shards):
    y = tmp_path / "exp.yaml"
    y.write_text(f"data:\n  train: [{shakespeare_shards}]\n  valid: [{shakespeare_shards}]\n  seq_len: 128\n")
    exp = load_config(Experiment, y, overrides=["data.seed=7", "data.document_masking=true"])
    assert exp.data.seq_len == 128 and exp.data.seed == 7 and exp.data.document_masking
    tok = exp.data.check_paths("data")
    assert tok["vocab_size"] == 2000 and tok["eos_id"] == 2


@pytest.mark.parametrize("override,key,reason", [
    ("data.seq_len=0", "data.seq_len", "must be >= 1"),
    ("data.train_weights=[1.0]", "data.train_weights", "has 1 entries for 2 train folders"),
    ("data.train_weights=[1.0,-2.0]", "data.train_weights[1]", "positive"),
    ("data.train_weights=[1.0,0.000001]", "data.train_weights", "gets no sample"),  # was a traceback at start-up
    ("data.train=[]", "data.train", "at least one"),
    ("data.valid_split=''", "data.valid_split", "must not be empty"),
])
def test_bad_values_name_their_key(tmp_path, override, key, reason):
    y = tmp_path / "exp.yaml"
    y.write_text("data:\n  train: [a, b]\n")
    with pytest.raises(ConfigError, match=reason) as e:
        load_config(Experiment, y, overrides=[override])
    assert e.value.key == key


def test_check_paths_names_the_bad_entry(tmp_path, shakespeare_shards, small_books):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="not found") as e:
        DataConfig(train=[str(shakespeare_shards), str(missing)]).check_paths("data")
    assert e.value.key == "data.train[1]"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no manifest") as e:
        DataConfig(train=[str(tmp_path / "empty")]).check_paths()
    assert e.value.key == "data.train[0]"
    with pytest.raises(ConfigError, match="no split 'test'") as e:
        DataConfig(train=[str(shakespeare_shards)], valid=[str(shakespeare_shards)], valid_split="test").check_paths()
    assert e.value.key == "data.valid[0]"
    with pytest.raises(ConfigError, match="fewer than seq_len") as e:
        DataConfig(train=[str(shakespeare_shards)], seq_len=10_000_000).check_paths("exp.data")
    assert e.value.key == "exp.data.train[0]"
    # Shards made with another tokenizer, mixed in, or a tokenizer that does not match.
    other_tok = train_tokenizer(small_books[:1], tmp_path / "tok600", vocab_size=600, num_threads=2)
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "' + "some words " * 2000 + '"}\n')
    other = tmp_path / "other_shards"
    tokenize_and_shard([str(j)], other, other_tok.path, ShardSettings(valid_fraction=0.0), progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="another tokenizer") as e:
        DataConfig(train=[str(shakespeare_shards), str(other)], seq_len=64).check_paths()
    assert e.value.key == "data.train[1]"
    with pytest.raises(ConfigError, match="is not the tokenizer the shards were made with") as e:
        DataConfig(train=[str(shakespeare_shards)], tokenizer=str(other_tok.path)).check_paths()
    assert e.value.key == "data.tokenizer"
