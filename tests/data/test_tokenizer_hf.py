"""Hugging Face tokenizers behind megamor's one Tokenizer interface (issue 30, point 1): a
byte-level BPE trained here, loaded by `load_tokenizer` from its folder or its tokenizer.json,
through tokenize-and-shard, the shard identity check, training and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megamor.config import ConfigError
from megamor.data.config import DataConfig
from megamor.data.errors import OutputExistsError
from megamor.data.manifest import load_manifest
from megamor.data.tokenizer import (
    HF_FILE,
    INFO_FILE,
    MODEL_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from megamor.data.tokenizer_train import train_tokenizer
from tests.data.conftest import outputs, run_tool
from tests.data.test_tokenizer import TRICKY


def test_hf_bpe_ids_round_trip_and_special_tokens(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer) and tok.path == hf_tokenizer_dir / HF_FILE
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)  # as megamor's sentencepiece models
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.vocab_size == 1000
    for s in TRICKY + ["</s> and <s> and <pad> as text", "<unk>"]:
        ids = tok.encode(s)
        assert all(4 <= i < tok.vocab_size for i in ids), s  # no special id from text, no <unk>: byte level
        assert tok.decode(ids) == s, repr(s)
    assert tok.encode("hi", add_bos=True, add_eos=True) == [1, *tok.encode("hi"), 2]
    assert tok.decode([1, *tok.encode("hi"), 2, 3]) == "hi"  # special tokens decode to nothing
    assert tok.encode_batch(TRICKY) == [tok.encode(s) for s in TRICKY]
    assert len(tok.encode("90817")) == 5  # digits one per token, as the sentencepiece models
    assert "".join(tok.token_strings(tok.encode("naïve 日本 🦀"))) == "naïve 日本 🦀"
    info = json.loads((hf_tokenizer_dir / INFO_FILE).read_text())
    assert info["kind"] == "hf-bpe" and info["content_hash"] == tok.content_hash
    assert tok.info()["kind"] == "hf" and tok.info()["hash"] == tok.content_hash


def test_autotokenizer_loads_the_trained_folder(hf_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(hf_tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    for s in TRICKY + ["text with </s> inside"]:
        assert hf.encode(s) == tok.encode(s), s


def test_identity_is_the_json_and_the_special_tokens(hf_tokenizer_dir, tmp_path):
    a = load_tokenizer(hf_tokenizer_dir)
    assert load_tokenizer(hf_tokenizer_dir / HF_FILE).content_hash == a.content_hash  # the file or its folder
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy2(hf_tokenizer_dir / HF_FILE, only / HF_FILE)  # no configs: no special-token roles
    bare = load_tokenizer(only)
    assert (bare.eos_id, bare.bos_id) == (-1, -1) and bare.content_hash != a.content_hash
    other = tmp_path / "other_eos"
    shutil.copytree(hf_tokenizer_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<pad>"}))
    b = load_tokenizer(other)
    assert b.eos_id == 3 and b.content_hash != a.content_hash  # same vocabulary, another EOS: another tokenizer
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": {"content": "<|eot|>"}}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<\|eot\|>' is not in the vocabulary"):
        load_tokenizer(other)


def test_a_post_processor_adding_bos_is_not_run(hf_tokenizer_dir, tmp_path):
    """Llama-3-style tokenizer.json files add BOS in a post-processor: megamor's encode adds no
    special token (the pipeline appends EOS itself), whatever the file says."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.processors import TemplateProcessing

    rust = RustTokenizer.from_file(str(hf_tokenizer_dir / HF_FILE))
    rust.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "llama_like"
    d.mkdir()
    rust.save(str(d / HF_FILE))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok, plain = load_tokenizer(d), load_tokenizer(hf_tokenizer_dir)
    assert rust.encode("hello").ids[0] == 1  # the file's own pipeline adds BOS
    assert tok.encode("hello") == plain.encode("hello") and tok.encode_batch(["hello"]) == [plain.encode("hello")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, -1, -1)  # roles the config names, -1 for the rest


def test_neither_kind_is_one_clear_error(tmp_path, tokenizer_dir):
    assert isinstance(load_tokenizer(tokenizer_dir), SentencePieceTokenizer)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a model at all")
    with pytest.raises(TokenizerError, match=rf"^{junk}: neither a sentencepiece model nor a Hugging Face tokenizer.json$"):
        load_tokenizer(junk)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=rf"^{bad_json}: not a Hugging Face tokenizer.json"):
        load_tokenizer(bad_json)
    with pytest.raises(TokenizerError, match=r"no tokenizer\.model .* or tokenizer\.json"):
        load_tokenizer(_empty(tmp_path))
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_hf_training_is_deterministic_and_never_mixes_kinds(tmp_path, small_books, tokenizer_dir):
    a = train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=600, kind="hf-bpe", sample_fraction=0.5, seed=3)
    b = train_tokenizer(small_books[:1], tmp_path / "b", vocab_size=600, kind="hf-bpe", sample_fraction=0.5, seed=3)
    assert a.content_hash == b.content_hash and (tmp_path / "a" / HF_FILE).read_bytes() == (tmp_path / "b" / HF_FILE).read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=600, kind="hf-bpe")
    with pytest.raises(OutputExistsError, match="another kind"):  # a folder with both would load as sentencepiece
        train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=600, overwrite=True)
    shutil.copytree(tokenizer_dir, tmp_path / "sp")
    with pytest.raises(OutputExistsError, match="another kind"):
        train_tokenizer(small_books[:1], tmp_path / "sp", vocab_size=600, kind="hf-bpe", overwrite=True)
    assert (tmp_path / "sp" / MODEL_FILE).read_bytes() == (tokenizer_dir / MODEL_FILE).read_bytes()  # untouched


@pytest.fixture(scope="module")
def hf_shards(tmp_path_factory, shared, hf_tokenizer_dir) -> Path:
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    out = tmp_path_factory.mktemp("hf_shards")
    tokenize_and_shard([str(shared / "tinyshakespeare" / "input.txt")], out, hf_tokenizer_dir,
                       ShardSettings(shard_tokens=40_000, valid_fraction=0.05), progress=False, log=lambda m: None)
    return out


def test_shards_record_the_hf_tokenizer_and_end_each_document_with_eos(hf_shards, hf_tokenizer_dir, shared):
    tok = load_tokenizer(hf_tokenizer_dir)
    m = load_manifest(hf_shards)
    assert m["tokenizer"]["hash"] == tok.content_hash and m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["eos_id"] == 2
    split = m["splits"]["train"]
    ids = np.concatenate([np.load(hf_shards / sh["file"]) for sh in split["shards"]])
    ends = np.flatnonzero(ids == tok.eos_id)
    assert len(ends) == split["documents"] and ends[-1] == len(ids) - 1  # one EOS closing each document
    first = tok.decode(ids[: ends[0]].tolist())
    assert first and first in (shared / "tinyshakespeare" / "input.txt").read_text()


def test_hf_shards_are_the_same_with_two_workers(hf_shards, hf_tokenizer_dir, shared, tmp_path):
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    tokenize_and_shard([str(shared / "tinyshakespeare" / "input.txt")], tmp_path / "w2", hf_tokenizer_dir / HF_FILE,
                       ShardSettings(shard_tokens=40_000, valid_fraction=0.05, unit_bytes=300_000), workers=2,
                       progress=False, log=lambda m: None)
    assert outputs(tmp_path / "w2") == outputs(hf_shards)


def test_shards_of_another_tokenizer_are_refused(hf_shards, shakespeare_shards, hf_tokenizer_dir, tokenizer_dir):
    assert DataConfig(train=[str(hf_shards)], seq_len=64, tokenizer=str(hf_tokenizer_dir)).check_paths()["kind"] == "hf"
    assert DataConfig(train=[str(hf_shards)], seq_len=64, tokenizer=str(hf_tokenizer_dir / HF_FILE)).check_paths()
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*is not the tokenizer the shards were made with"):
        DataConfig(train=[str(hf_shards)], seq_len=64, tokenizer=str(tokenizer_dir)).check_paths()
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*is not the tokenizer the shards were made with"):
        DataConfig(train=[str(shakespeare_shards)], seq_len=64, tokenizer=str(hf_tokenizer_dir)).check_paths()
    with pytest.raises(ConfigError, match=r"data\.train\[1\].*another tokenizer"):
        DataConfig(train=[str(hf_shards), str(shakespeare_shards)], seq_len=64).check_paths()


def test_cli_trains_hf_bpe_and_refuses_a_file_of_neither_kind(tmp_path, shared):
    src = str(shared / "tinyshakespeare" / "input.txt")
    p = run_tool("train_tokenizer.py", src, "--out", str(tmp_path / "tok"), "--kind", "hf-bpe", "--vocab-size", "500")
    assert "tokenizer.json" in p.stdout and isinstance(load_tokenizer(tmp_path / "tok"), HFTokenizer)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x08\x99garbage")
    p = run_tool("tokenize_and_shard.py", src, "--tokenizer", str(junk), "--out", str(tmp_path / "s"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr  # bad input
    assert p.stderr.strip().splitlines()[-1].endswith(f"{junk}: neither a sentencepiece model nor a Hugging Face tokenizer.json")
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.launch
def test_train_on_hf_shards_keeps_the_tokenizer_and_exports_it(hf_shards, hf_tokenizer_dir, tokenizer_dir, tmp_path):
    """tokenize -> shard -> `python -m megamor.train` (3 steps, data.tokenizer = the HF folder)
    -> the run folder's copy of the tokenizer -> an export AutoTokenizer loads."""
    transformers = pytest.importorskip("transformers")
    from megamor.export import export
    from megamor.train.signals import EXIT_CONFIG
    from tests.train.conftest import TINY_YAML
    from tests.train.helpers import assert_ok, launch

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(shards=hf_shards))
    run = launch(cfg, tmp_path / "run", ["model.vocab_size=1024", f"data.tokenizer={hf_tokenizer_dir}", "trainer.max_steps=3",
                                         "checkpoint.every_steps=3", "eval.at_end=false"])
    assert_ok(run)
    tok = load_tokenizer(hf_tokenizer_dir)
    kept = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert kept.kind == "hf" and kept.content_hash == tok.content_hash
    out = export(tmp_path / "run")
    text = "Now is the winter of our discontent\nMade glorious summer 1592."
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == tok.encode(text)
    # the same run with the sentencepiece tokenizer named instead is refused before it starts
    bad = launch(cfg, tmp_path / "run2", ["model.vocab_size=1024", f"data.tokenizer={tokenizer_dir}"])
    assert bad.rc == EXIT_CONFIG and "is not the tokenizer the shards were made with" in bad.output, bad.output[-2000:]
