"""Evaluation loads either tokenizer kind through megamor's one loader: a Hugging Face byte-level
BPE trained here scores through the entry points and the lm-eval adapter; a file of neither
kind is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamor.eval.errors import EvalInputError
from megamor.eval.tokenizer import EvalTokenizer, load_tokenizer
from tests.eval.conftest import VOCAB
from tests.eval.test_cli import load, run_entry


@pytest.fixture(scope="module")
def hf_dir(shared_data: Path, tmp_path_factory) -> Path:
    from megamor.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("hf_tok")
    train_tokenizer([str(shared_data / "tinyshakespeare" / "input.txt")], out, vocab_size=VOCAB, kind="hf-bpe")
    return out


def test_hf_tokenizer_is_an_eval_tokenizer(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, EvalTokenizer) and tok.eos_id == 2 and tok.vocab_size == VOCAB
    s = "To be, or not to be: that is the question."
    assert tok.decode(tok.encode(s)) == s and tok.eos_id not in tok.encode(s)
    from megamor.eval.depth import token_strings

    assert "".join(token_strings(tok, tok.encode(s))) == s


def test_perplexity_and_lm_eval_adapter_with_an_hf_tokenizer(mor_model, mor_checkpoint, hf_dir, tmp_path, data_dir):
    res = load("perplexity").main([
        "--checkpoint", str(mor_checkpoint), "--tokenizer", str(hf_dir / "tokenizer.json"),
        "--text", str(data_dir / "wikitext-2-raw" / "wiki.valid.raw"), "--split", "wikitext", "--max-docs", "1",
        "--max-length", "64", "--stride", "64", "--out", str(tmp_path / "ppl.json"), "--no-progress",
    ])["perplexity"]
    assert res["docs"] == 1 and res["token_perplexity"] > 1
    from megamor.eval.lm_eval_adapter import MegamorLM

    lm = MegamorLM(model=mor_model, tokenizer=str(hf_dir), batch_size=2, device="cpu")
    tok = load_tokenizer(hf_dir)
    assert lm.eot_token_id == 2 and lm.tok_encode("hello there") == [2, *tok.encode("hello there")]
    assert lm.tok_decode(tok.encode("hello there")) == "hello there"


def test_a_tokenizer_of_neither_kind_is_one_line_exit_2(mor_checkpoint, tmp_path):
    junk = tmp_path / "tok.model"
    junk.write_bytes(b"\x0a\x03abc not a model")
    with pytest.raises(EvalInputError, match=r"neither a sentencepiece model nor a Hugging Face tokenizer\.json"):
        load_tokenizer(junk)
    p = run_entry("perplexity", "--checkpoint", str(mor_checkpoint), "--tokenizer", str(junk), "--text", str(junk))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"{junk}: neither a sentencepiece model nor a Hugging Face tokenizer.json")
