"""The tokenizer wrapper and training: documented ids, lossless round trip, determinism."""

from __future__ import annotations

import hashlib
import json

import pytest

from megamor.data.errors import DataError, OutputExistsError
from megamor.data.tokenizer import INFO_FILE, MODEL_FILE, Tokenizer
from megamor.data.tokenizer_train import train_tokenizer

TRICKY = [
    "plain words", " leading space", "two  spaces and trailing ", "\nstarts with newline", "a\n\n\nb",
    "tab\tand\u00a0nbsp", "emoji \U0001F600 and \u00fc\u00df\u4e2d\u6587", "12345 + 678 = 13023", "", "   ",
    "x\r\ny", "unseen \u16a0\u16a1 runes", "\ufffd replacement",
]


def test_ids_and_files(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 2000
    assert tok.sp.piece_to_id("\n") != tok.unk_id and tok.id_to_piece(tok.sp.piece_to_id("\n")) == "\n"
    assert tok.content_hash == hashlib.sha256((tokenizer_dir / MODEL_FILE).read_bytes()).hexdigest()
    assert Tokenizer.load(tokenizer_dir / MODEL_FILE).content_hash == tok.content_hash
    info = json.loads((tokenizer_dir / INFO_FILE).read_text())
    assert info["content_hash"] == tok.content_hash
    assert info["ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "newline": tok.sp.piece_to_id("\n")}
    assert info["settings"]["vocab_size"] == 2000 and info["read_stats"]["documents"] > 1000
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tokenizer_dir / "missing")


def test_round_trip_is_lossless(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    for s in TRICKY:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s, repr(s)
    assert tok.encode("hi", add_bos=True, add_eos=True) == [1, *tok.encode("hi"), 2]
    assert tok.decode(tok.encode("hi", add_eos=True)) == "hi"  # control ids decode to nothing
    assert tok.encode_batch(TRICKY) == [tok.encode(s) for s in TRICKY]
    digits = tok.encode("90817")
    assert len(digits) >= 5  # digits split one per token


def test_training_is_deterministic_and_refuses_overwrite(tmp_path, small_books, tokenizer_dir):
    a = train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=1000, num_threads=2, sample_fraction=0.5, seed=3)
    b = train_tokenizer(small_books[:1], tmp_path / "b", vocab_size=1000, num_threads=2, sample_fraction=0.5, seed=3)
    assert a.content_hash == b.content_hash
    c = train_tokenizer(small_books[:1], tmp_path / "c", vocab_size=1000, num_threads=2, sample_fraction=0.5, seed=4)
    assert c.content_hash != a.content_hash  # another sample of documents
    with pytest.raises(OutputExistsError, match="already exists"):
        train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=1000)
    u = train_tokenizer(small_books[:1], tmp_path / "a", vocab_size=1000, model_type="unigram", overwrite=True)
    assert u.content_hash != a.content_hash and u.decode(u.encode("To be, or not")) == "To be, or not"


def test_training_errors_are_clear(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("just a few words here\n")
    with pytest.raises(DataError, match=r"Vocabulary size too high.*--soft-vocab-limit"):
        train_tokenizer([str(p)], tmp_path / "t", vocab_size=5000)
    tok = train_tokenizer([str(p)], tmp_path / "t", vocab_size=5000, soft_vocab_limit=True)
    assert tok.vocab_size < 5000
    with pytest.raises(DataError, match="input not found"):
        train_tokenizer([str(tmp_path / "nope.txt")], tmp_path / "u", vocab_size=300)
    with pytest.raises(DataError, match=r"required_chars.*raise --vocab-size, or lower --character-coverage"):
        train_tokenizer([str(p)], tmp_path / "v", vocab_size=10)  # fewer pieces than the corpus has characters
