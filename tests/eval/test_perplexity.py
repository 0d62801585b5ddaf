"""Perplexity: disjoint windows against plain independent computations (and lm-eval's window
functions), stride = window equals disjoint, sliding windows, bits per byte and word counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megamor.eval.perplexity import (
    count_words,
    perplexity_of_texts,
    perplexity_of_tokens,
    read_texts,
    split_wikitext_articles,
    window_spans,
)
from megamor.eval.scoring import Scorer

L = 64  # window length (the model allows 256): several windows per document


@pytest.fixture(scope="module")
def texts(shared_data):
    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()
    arts = split_wikitext_articles(raw)
    # two real articles (cut short) and a short non-ASCII text
    return [arts[0][:2500], arts[1][:1200], "Café naïve — “quoted” 日本語 text.\n"]


@torch.no_grad()
def plain_nll(model, windows: list[tuple[list[int], list[int]]]) -> float:
    """Independent reference: each (context, continuation) window alone, unbatched, no mask."""
    total = 0.0
    for ctx, cont in windows:
        seq = torch.tensor(ctx + cont)
        logits = model(seq[None, :-1], causal_routing=True).logits[0].double()
        lp = F.log_softmax(logits, -1)[-len(cont) :]
        total -= lp.gather(1, torch.tensor(cont)[:, None]).sum().item()
    return total


def test_window_spans_cover_every_token_once():
    for n in (1, 5, 63, 64, 65, 200, 256):
        for stride in (1, 7, 32, 64):
            spans = window_spans(n, 64, stride)
            covered = [t for s, b, k in spans for t in range(b - k, b)]
            assert covered == list(range(n))
            assert all(b - s <= 64 and s <= b - k for s, b, k in spans)
    with pytest.raises(ValueError):
        window_spans(10, 64, 65)


def test_disjoint_windows_equal_plain_and_lm_eval_windows(mor_model, tok, texts):
    scorer = Scorer(mor_model, batch_size=8, max_length=L, pad_id=tok.eos_id)
    res = perplexity_of_texts(scorer, tok, texts)
    ref_windows = []
    for t in texts:
        toks = tok.encode(t)
        lm_eval_windows = list(map(make_disjoint_window, get_rolling_token_windows(toks, tok.eos_id, L, 1)))
        ref_windows += lm_eval_windows
        # lm-eval's windows are what a plain chunking gives: L-token chunks predicted from
        # [previous token] + chunk, the last one filled up with earlier context.
        assert [c for _, c in lm_eval_windows] == [toks[i : i + L] for i in range(0, len(toks), L)]
    assert res.windows == len(ref_windows)
    ref = plain_nll(mor_model, ref_windows)
    assert res.tokens == sum(len(tok.encode(t)) for t in texts)
    assert math.isclose(res.nll, ref, rel_tol=1e-5), (res.nll, ref)

    # and against the plainest possible loop: one long stream cut into L-token chunks
    stream = [tok.eos_id] + tok.encode(texts[0])
    total = 0.0
    with torch.no_grad():
        for a in range(0, len(stream) - 1, L):
            b = min(a + L, len(stream) - 1)
            start = max(0, b - L)
            logits = mor_model(torch.tensor(stream[start:b])[None], causal_routing=True).logits[0].double()
            lp = F.log_softmax(logits, -1)[a - start :]
            total -= lp.gather(1, torch.tensor(stream[a + 1 : b + 1])[:, None]).sum().item()
    one = perplexity_of_texts(scorer, tok, texts[:1])
    assert math.isclose(one.nll, total, rel_tol=1e-5)


def test_stride_equal_to_window_is_disjoint_and_sliding_matches_reference(mor_model, tok, texts):
    scorer = Scorer(mor_model, batch_size=8, max_length=L, pad_id=tok.eos_id)
    disjoint = perplexity_of_texts(scorer, tok, texts[:2])
    same = perplexity_of_texts(scorer, tok, texts[:2], stride=L)
    assert same.nll == pytest.approx(disjoint.nll, rel=1e-9) and same.windows == disjoint.windows

    stride = 24
    slide = perplexity_of_texts(scorer, tok, texts[:2], stride=stride)
    # Reference (the Hugging Face perplexity guide's loop): windows ending every `stride`
    # tokens, each scoring only its tokens not scored before.
    ref = 0.0
    with torch.no_grad():
        for t in texts[:2]:
            ids = [tok.eos_id] + tok.encode(t)
            n = len(ids) - 1
            prev_end = 0
            end = min(L, n)
            while prev_end < n:
                begin = max(0, end - L)
                inp = torch.tensor(ids[begin : end + 1])
                logits = mor_model(inp[None, :-1], causal_routing=True).logits[0].double()
                trg = inp[1:].clone()
                trg[: len(trg) - (end - prev_end)] = -100
                ref += F.cross_entropy(logits, trg, ignore_index=-100, reduction="sum").item()
                prev_end, end = end, min(end + stride, n)
    assert slide.nll == pytest.approx(ref, rel=1e-5)
    assert slide.tokens == disjoint.tokens and slide.tokens_run > disjoint.tokens_run
    assert slide.nll != pytest.approx(disjoint.nll, rel=1e-6)  # the extra context changes the scores


def test_bits_per_byte_agrees_with_byte_count(mor_model, tok, texts):
    scorer = Scorer(mor_model, batch_size=8, max_length=L, pad_id=tok.eos_id)
    res = perplexity_of_texts(scorer, tok, texts).to_dict()
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert res["bytes"] == n_bytes and n_bytes > sum(len(t) for t in texts)  # the non-ASCII text counts bytes
    assert res["bits_per_byte"] * n_bytes * math.log(2) == pytest.approx(res["nll"], rel=1e-12)
    assert res["byte_perplexity"] == pytest.approx(2 ** res["bits_per_byte"], rel=1e-12)
    assert res["words"] == sum(count_words(t) for t in texts)
    assert res["word_perplexity"] == pytest.approx(math.exp(res["nll"] / res["words"]), rel=1e-12)
    assert res["token_perplexity"] == pytest.approx(math.exp(res["nll"] / res["tokens"]), rel=1e-12)


def test_token_stream_equals_text_path(mor_model, tok, texts, tmp_path):
    scorer = Scorer(mor_model, batch_size=8, max_length=L, pad_id=tok.eos_id)
    ids = np.asarray(tok.encode(texts[0]), dtype=np.uint16)
    np.save(tmp_path / "val-00000.npy", ids)
    from megamor.eval.perplexity import load_shard_tokens

    loaded = load_shard_tokens([tmp_path], split="val")
    a = perplexity_of_tokens(scorer, loaded, tok.eos_id, tok=tok)
    b = perplexity_of_texts(scorer, tok, texts[:1])
    assert a.nll == pytest.approx(b.nll, rel=1e-9) and a.tokens == b.tokens


def test_read_texts_splits(tmp_path):
    p = tmp_path / "w.txt"
    p.write_text(" = A = \n\n x \n = = sub = = \n y \n = B = \n\n z \n")
    assert len(read_texts([p], split="wikitext")) == 2
    assert len(read_texts([p], split="file")) == 1
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert read_texts([j]) == ["a b", "c"]


def test_read_texts_refuses_empty_and_undecodable_files(tmp_path):
    from megamor.eval.tasks.base import TaskDataError

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TaskDataError, match=rf"^{empty}: no text to evaluate"):
        read_texts([empty])
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    with pytest.raises(TaskDataError, match=rf"^{blank}: no text"):
        read_texts([blank], split="blank")
    latin = tmp_path / "latin1.txt"
    data = "first line\ncaf\u00e9 au lait\n".encode("latin-1")
    latin.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(TaskDataError, match=rf"^{latin}:2: not valid utf-8 at byte offset {offset} .*--encoding"):
        read_texts([latin])
    assert read_texts([latin], encoding="latin-1") == ["first line\ncaf\u00e9 au lait\n"]
    assert read_texts([latin], errors="replace") == ["first line\ncaf\ufffd au lait\n"]
    bad_jsonl = tmp_path / "d.jsonl"
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TaskDataError, match=rf"^{bad_jsonl}:2: not valid UTF-8"):
        read_texts([bad_jsonl])


def test_read_texts_says_a_missing_file_is_missing(tmp_path):
    from megamor.eval.tasks.base import TaskDataError

    with pytest.raises(TaskDataError, match=rf"^{tmp_path / 'nope.txt'}: no such file \(the text to evaluate is missing\)$"):
        read_texts([tmp_path / "nope.txt"])
    with pytest.raises(TaskDataError, match=rf"^{tmp_path}: is a folder, not a text file$"):
        read_texts([tmp_path])
