"""Harness metrics on known log-likelihoods (no model), against lm-eval's metric functions."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

from megamor.eval.harness import aggregate, encode_pair, evaluate_task, markdown_table, score_docs, write_results
from megamor.eval.metrics import mean_stderr
from megamor.eval.tasks import get_task


class FixedScorer:
    """Stands in for Scorer: returns preset log-likelihoods in request order."""

    def __init__(self, lls):
        self.lls = list(lls)
        self.pairs = []

    def loglikelihood(self, pairs, desc=""):
        self.pairs = list(pairs)
        assert len(pairs) == len(self.lls)
        return [(x, False) for x in self.lls]


class CharTok:
    """A character-level tokenizer (one id per character, EOS = 0)."""

    eos_id = 0
    vocab_size = 0x110000

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def arc_docs(tmp_path, rows):
    p = tmp_path / "arc.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "question": {"stem": q, "choices": [{"text": t, "label": "ABCD"[j]} for j, t in enumerate(ch)]}, "answerKey": k}) + "\n" for i, (q, ch, k) in enumerate(rows)))
    return get_task("arc_easy", path=p)


def test_acc_acc_norm_acc_bytes(tmp_path):
    task = arc_docs(tmp_path, [("q1", ["a", "bbbb"], "B"), ("q2", ["é", "ee"], "A"), ("q3", ["x", "y"], "A")])
    lls = [-1.0, -3.0,  # acc picks a (wrong), per char: -1 vs -0.75 -> bbbb (right)
           -2.1, -2.0,  # acc picks ee (wrong); per char: -2.1 vs -1.0 -> ee; per byte: -1.05 vs -1.0 -> ee
           -1.0, -1.0]  # a tie: argmax takes the first, as numpy/lm-eval do (right)
    res = evaluate_task(FixedScorer(lls), CharTok(), task, docs=task.load())
    assert res.metrics["acc"] == pytest.approx(1 / 3)
    assert res.metrics["acc_norm"] == pytest.approx(2 / 3)
    assert res.metrics["acc_bytes"] == pytest.approx(2 / 3)
    per, _ = score_docs(task, task.load(), ["", "", ""], [(x, False) for x in lls])
    assert per["acc"] == [0.0, 0.0, 1.0] and per["acc_norm"] == [1.0, 0.0, 1.0]
    # "é" is 1 character but 2 bytes: by characters "ee" wins, by bytes "é" does
    per2, _ = score_docs(task, task.load(), [""] * 3, [(x, False) for x in [-1, -3, -2.1, -3.0, -1, -1]])
    assert per2["acc_norm"][1] == 0.0 and per2["acc_bytes"][1] == 1.0


def test_stderr_matches_lm_eval():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert mean_stderr(xs) == pytest.approx(lm_eval_mean_stderr(xs), rel=1e-12)
    agg = aggregate({"acc": xs, "perplexity": [-1.0, -2.0, -3.0]})
    assert agg["perplexity"] == pytest.approx(2.718281828459045 ** 2)
    assert agg["acc_stderr"] == pytest.approx(lm_eval_mean_stderr(xs))


def test_encode_pair_moves_trailing_space_and_prefixes_eos():
    tok = CharTok()
    assert encode_pair(tok, "ab ", "c", tok.eos_id) == ([0, ord("a"), ord("b")], [ord(" "), ord("c")])
    assert encode_pair(tok, "", "xy", tok.eos_id) == ([0], [ord("x"), ord("y")])
    assert encode_pair(tok, "ab", " c", None) == ([ord("a"), ord("b")], [ord(" "), ord("c")])


def test_lambada_and_winogrande_requests(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"text": "the cat sat on the mat"}\n')
    lam = get_task("lambada", path=p)
    s = FixedScorer([-2.0])
    res = evaluate_task(s, CharTok(), lam)
    assert CharTok().decode(s.pairs[0][1]) == " mat" and res.metrics["perplexity"] == pytest.approx(2.718281828459045**2)


def test_results_files(tmp_path):
    task = arc_docs(tmp_path, [("q", ["a", "b"], "A"), ("r", ["a", "b"], "B")])
    res = {"arc_easy": evaluate_task(FixedScorer([-1, -2, -1, -2]), CharTok(), task)}
    write_results(res, tmp_path / "out" / "r.json", with_samples=True)
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["results"]["arc_easy"]["metrics"]["acc"] == 0.5 and len(data["results"]["arc_easy"]["samples"]) == 2
    md = (tmp_path / "out" / "r.md").read_text()
    assert md == markdown_table(res) and "| arc_easy | 2 | 0 | acc | 0.5000 | 0.5000 |" in md
