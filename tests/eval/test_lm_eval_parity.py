"""The built-in harness and lm-eval (through the `megamor` adapter and the YAMLs in
evals/tasks/) agree exactly on the same small trained MoR model and the same examples.

The two paths share only the model and the `Scorer`; prompts (Python vs the YAMLs' Jinja),
context/continuation tokenization (ours vs lm-eval's `TemplateLM._encode_pair`), few-shot
formatting, metric computation and aggregation are independent."""

from __future__ import annotations

import math

import lm_eval
import lm_eval.evaluator
import pytest
from lm_eval.tasks import TaskManager

from megamor.env import repo_root
from megamor.eval.errors import EvalInputError
from megamor.eval.harness import evaluate_task
from megamor.eval.lm_eval_adapter import MegamorLM
from megamor.eval.perplexity import perplexity_of_texts, read_texts
from megamor.eval.scoring import Scorer
from megamor.inference.generate import generate

LIMIT = 40
BATCH = 16


@pytest.fixture(scope="module")
def lm(mor_model, tok):
    return MegamorLM(model=mor_model, tokenizer=tok, batch_size=BATCH)


@pytest.fixture(scope="module")
def tm():
    return TaskManager(include_path=str(repo_root() / "evals" / "tasks"), include_defaults=False)


@pytest.fixture(autouse=True)
def _no_env_probe(monkeypatch):
    # lm-eval probes the machine (pip, nvidia-smi, ...) for its report: seconds we do not need.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda *a, **k: None)


def run_lm_eval(lm, tm, task: str, limit: int) -> tuple[dict, list]:
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, bootstrap_iters=10, log_samples=True, verbosity="ERROR")
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "arc_easy", "winogrande", "lambada"])
def test_harness_equals_lm_eval(name, lm, tm, mor_model, tok, data_dir):
    ours = evaluate_task(Scorer(mor_model, batch_size=BATCH, pad_id=tok.eos_id), tok, name, limit=LIMIT, data_dir=data_dir)
    theirs, samples = run_lm_eval(lm, tm, f"megamor_{name}", LIMIT)
    assert ours.n == len(samples) == LIMIT
    # per example, per choice: the same log-likelihoods, bit for bit
    for s, o in zip(samples, ours.samples):
        assert [r[0] for r in s["filtered_resps"]] == o["loglikelihoods"], o["src"]
    metrics = [m for m in ("acc", "acc_norm", "acc_bytes") if f"{m},none" in theirs]
    assert metrics == [m for m in ("acc", "acc_norm", "acc_bytes") if m in ours.metrics]
    for m in metrics:
        assert ours.metrics[m] == theirs[f"{m},none"], m
        assert ours.metrics[m + "_stderr"] == pytest.approx(theirs[f"{m}_stderr,none"], rel=1e-9)
    if name == "lambada":
        assert ours.metrics["perplexity"] == pytest.approx(theirs["perplexity,none"], rel=1e-12)
    else:
        # a real comparison: a mostly-untrained model is not always right or always wrong
        assert 0 < ours.metrics["acc"] < 1


def test_rolling_loglikelihood_equals_perplexity(lm, tm, mor_model, tok, data_dir):
    theirs, _ = run_lm_eval(lm, tm, "megamor_wikitext", 2)
    docs = read_texts([data_dir / "wikitext-2-raw" / "wiki.test.raw"], split="wikitext")[:2]
    ours = perplexity_of_texts(Scorer(mor_model, batch_size=BATCH, pad_id=tok.eos_id), tok, docs).to_dict()
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(ours[m], theirs[f"{m},none"], rel_tol=1e-9), m


def test_generate_until(lm, tok):
    from lm_eval.api.instance import Instance

    reqs = [
        Instance("generate_until", {}, ("To be, or not to be", {"until": ["\n"], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("The king", {"until": ["\n"], "max_gen_toks": 5}), 1),
    ]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(o, str) and "\n" not in o for o in out)
    # greedy and deterministic, and the same text the model's own generate gives
    assert lm.generate_until(reqs) == out
    ids = generate(lm.model, [[tok.eos_id] + tok.encode("The king")], 5, eos_id=tok.eos_id).tokens[0]
    assert out[1] == tok.decode([t for t in ids if t != tok.eos_id]).split("\n")[0]
    # max_gen_toks filling the whole context left one prompt token (silently); now one line
    big = Instance("generate_until", {}, ("The king", {"until": ["\n"], "max_gen_toks": lm.max_length}), 0)
    with pytest.raises(EvalInputError, match="no room for its prompt"):
        lm.generate_until([big])
