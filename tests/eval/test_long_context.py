"""Long examples (issue 27): contexts are left-truncated as lm-eval does (the continuation stays
whole), the default context is the model's max_seq_len (not the training data.seq_len), and a
continuation that alone exceeds the context stops the tool with one line naming the task, the
example and --max-length. On the shared PIQA with a 128-token model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamor.eval.cli import run_main
from megamor.eval.harness import encode_pair
from megamor.eval.scoring import ContinuationTooLong, Scorer
from megamor.eval.tasks import PAPER_TASKS, get_task

from .test_checkpoint import training_run
from .test_cli import load


def with_context(model, n: int):
    """The same weights with max_seq_len n (RoPE does not depend on it)."""
    from megamor.model import MoRLM

    m = MoRLM(dataclasses.replace(model.cfg, max_seq_len=n))
    m.load_state_dict(model.state_dict())
    return m.eval()


@pytest.fixture(scope="module")
def piqa_lengths(tok, shared_data) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of the first 60 PIQA docs, two per doc."""
    task = get_task("piqa")
    docs = task.load(shared_data)[:60]
    return [encode_pair(tok, c, x, tok.eos_id) for d in docs for c, x in task.requests(d)]


def first_doc_too_long(pairs, n: int) -> int:
    """Index of the first doc with a continuation longer than n tokens."""
    return next(i // 2 for i, (_, x) in enumerate(pairs) if len(x) > n)


def test_left_truncation_keeps_the_continuation_whole(mor_model, piqa_lengths):
    model = with_context(mor_model, 128)
    scorer = Scorer(model, batch_size=8)
    assert scorer.max_length == 128  # the model's max_seq_len by default
    long = [(c, x) for c, x in piqa_lengths if len(c) + len(x) > 129 and len(x) <= 128]
    assert long, "PIQA's first 60 docs hold requests longer than 128 tokens whose answer fits"
    got = scorer.loglikelihood(long)
    wide = Scorer(model, batch_size=8, max_length=1024)
    kept = [(c[len(c) + len(x) - 129 :], x) for c, x in long]  # the newest context tokens that fit, whole answer
    assert got == wide.loglikelihood(kept)
    full = wide.loglikelihood(long)
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(got, full))  # the dropped context mattered
    with pytest.raises(ContinuationTooLong) as e:
        scorer.loglikelihood([([1, 2], [5] * 129)])
    assert (e.value.index, e.value.n_tokens, e.value.max_length) == (0, 129, 128)


def test_fewshot_on_piqa_with_a_128_token_model(mor_model, spm_path, piqa_lengths, tmp_path, data_dir, capsys):
    ck = tmp_path / "m128.pt"
    model = with_context(mor_model, 128)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg), "step": 1}, ck)
    fewshot = load("fewshot")
    args = ["--checkpoint", str(ck), "--tokenizer", str(spm_path), "--tasks", "piqa", "--data-dir", str(data_dir),
            "--no-progress", "--batch-size", "8"]
    # Every doc before the first one whose answer alone exceeds 128 tokens scores (some left-truncated).
    n = first_doc_too_long(piqa_lengths, 128)
    assert any(len(c) + len(x) > 129 for c, x in piqa_lengths[: 2 * n])
    out = fewshot.main([*args, "--limit", str(n)])
    assert out["results"]["piqa"]["n"] == n and out["meta"]["context_from"] == "model.max_seq_len"
    # That doc: one error line naming the task, the example and the option, exit 2; no traceback.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: fewshot.main([*args, "--limit", str(n + 1)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].split(": error: ", 1)[1].startswith(f"piqa: {data_dir / 'piqa' / 'valid.jsonl'}:{n + 1}: a continuation of ")
    assert "does not fit the 128-token context; pass a larger --max-length (the model's max_seq_len is 128)" in err[0]
    # ... which --max-length fixes.
    out = fewshot.main([*args, "--limit", str(n + 1), "--max-length", "1024"])
    assert out["results"]["piqa"]["n"] == n + 1 and out["meta"]["context_from"] == "--max-length"


@pytest.fixture(scope="module")
def run_512(mor_model, spm_path, tmp_path_factory):
    """The issue's case (configs/experiments/small_cpu.yaml): trained on 128-token windows
    (data.seq_len), max_seq_len 512."""
    return training_run(tmp_path_factory.mktemp("r512"), with_context(mor_model, 512), spm_path, steps=(100,))


def test_default_context_is_max_seq_len_not_the_training_seq_len(run_512, spm_path, piqa_lengths, data_dir):
    n = first_doc_too_long(piqa_lengths, 128) + 1  # includes an answer longer than data.seq_len
    out = load("fewshot").main(["--checkpoint", str(run_512), "--tokenizer", str(spm_path), "--tasks", "piqa",
                                "--limit", str(n), "--data-dir", str(data_dir), "--no-progress", "--batch-size", "8"])
    assert out["results"]["piqa"]["n"] == n and out["meta"]["seq_len"] == 128
    assert out["meta"]["context_from"] == "model.max_seq_len"


def test_sweep_default_task_list_runs(run_512, spm_path, piqa_lengths, data_dir, tmp_path):
    n = first_doc_too_long(piqa_lengths, 128) + 1
    out = load("sweep").main([str(run_512), "--out", str(tmp_path / "s"), "--tokenizer", str(spm_path), "--limit", str(n),
                              "--data-dir", str(data_dir), "--no-plots", "--no-progress", "--batch-size", "8"])
    assert out["computed"] == len(PAPER_TASKS) and not out["missing"]
    assert "piqa" in PAPER_TASKS and (tmp_path / "s" / "results.md").read_text().count("piqa") >= 1
