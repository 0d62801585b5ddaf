"""The paper's evaluation: the `paper` suite (six columns, ARC once, the released eval's metrics),
MMLU continuation read from the standard CSV layout, and top-k routing (non-causal) beside causal."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megamor.eval.cli import run_main
from megamor.eval.harness import TaskResult, encode_pair, evaluate_task, markdown_table
from megamor.eval.paper import PAPER_METRICS, paper_summary, suite_average
from megamor.eval.scoring import Scorer, ScoreRequest
from megamor.eval.sweep import average_rows
from megamor.eval.tasks import SUITES, TaskDataError, expand_suites, get_task
from megamor.testing.scripts import load_evals_script

# subject -> rows (question, A, B, C, D, answer); a comma and a quote in a field test the CSV reading
MMLU_ROWS = {
    "high_school_biology": [
        ["Which organelle makes most of a cell's ATP?", "the nucleus", "the mitochondrion", "the ribosome", "the vacuole", "B"],
        ['What does "DNA" stand for, in short?', "deoxyribonucleic acid", "a protein", "a sugar", "a lipid", "A"],
    ],
    "world_history": [
        ["In which year did the Second World War end?", "1918", "1939", "1945", "1989", "C"],
        ["Who was the first emperor of Rome?", "Nero", "Caligula", "Julius Caesar", "Augustus", "D"],
        ["Which city was the capital of the Byzantine Empire?", "Athens", "Constantinople", "Alexandria", "Antioch", "B"],
    ],
}


def write_mmlu(root: Path, rows: dict[str, list[list[str]]] = MMLU_ROWS) -> Path:
    """An MMLU folder in the standard layout: {dev,val,test}/<subject>_<split>.csv, no header."""
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rs in rows.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rs[:1] if split == "dev" else rs)
    return root


load_tool = load_evals_script


# -- MMLU --------------------------------------------------------------------------------------
def test_mmlu_reads_the_csv_layout(tmp_path):
    task = get_task("mmlu", path=write_mmlu(tmp_path / "mmlu"))
    docs = task.load()
    assert len(docs) == 5 and [d["subject"] for d in docs] == ["high_school_biology"] * 2 + ["world_history"] * 3
    assert docs[1]["question"] == 'What does "DNA" stand for, in short?'
    assert [task.doc_to_target(d) for d in docs] == [1, 0, 2, 3, 1]
    assert docs[0]["_src"].endswith("test/high_school_biology_test.csv:1")
    ctx, cont = task.requests(docs[2])[2]
    assert ctx == "The following are questions (with answers) about world history.\n\nQuestion: In which year did the Second World War end?\nAnswer:"
    assert cont == " 1945"
    assert len(task.load_fewshot()) == 2  # dev/: one per subject


def test_mmlu_folder_from_the_environment(tmp_path, monkeypatch):
    folder = write_mmlu(tmp_path / "elsewhere")
    monkeypatch.setenv("MEGAMOR_MMLU_DIR", str(folder))
    assert get_task("mmlu").eval_file(tmp_path / "data") == folder
    monkeypatch.delenv("MEGAMOR_MMLU_DIR")
    assert get_task("mmlu").eval_file(tmp_path / "data") == tmp_path / "data" / "mmlu"


@pytest.mark.parametrize(("row", "reason"), [
    (["q", "a", "b", "c", "d", "E"], r"answer must be one of \('A', 'B', 'C', 'D'\), got 'E'"),
    (["q", "a", "b", "c", "B"], "expected 6 fields"),
])
def test_mmlu_bad_row_names_file_and_line(tmp_path, row, reason):
    folder = write_mmlu(tmp_path / "mmlu", {"anatomy": [["q", "a", "b", "c", "d", "A"], row]})
    with pytest.raises(TaskDataError, match=rf"anatomy_test.csv:2: {reason}"):
        get_task("mmlu", path=folder).load()


def test_missing_mmlu_is_one_line_exit_2(tmp_path, capsys, mor_checkpoint, spm_path):
    missing = tmp_path / "no_mmlu"
    with pytest.raises(SystemExit) as e:
        run_main(lambda: load_tool("fewshot").main(["--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path),
                                                    "--tasks", "paper", "--mmlu-dir", str(missing)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "--mmlu-dir" in err[0] and "MEGAMOR_MMLU_DIR" in err[0]
    assert "Traceback" not in err[0]


def reference_choice_lls(model, tok, context: str, choices: list[str]) -> list[float]:
    """A plain loop: each choice's summed log-probability after EOS + the context, one forward each."""
    out = []
    for c in choices:
        ctx_ids = tok.encode(context)
        whole = tok.encode(context + " " + c)
        assert whole[: len(ctx_ids)] == ctx_ids
        ids = [tok.eos_id, *whole]
        n = len(whole) - len(ctx_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), causal_routing=True).logits[0].float()
        lp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        out.append(float(lp[-n:].sum()))
    return out


def test_mmlu_scores_match_a_reference_loop(tmp_path, mor_model, tok):
    task = get_task("mmlu", path=write_mmlu(tmp_path / "mmlu"))
    res = evaluate_task(Scorer(mor_model, batch_size=4, pad_id=tok.eos_id), tok, task)
    assert res.n == 5 and set(res.metrics) == {"acc", "acc_stderr"}
    preds = []
    for subject, rows in MMLU_ROWS.items():
        for q, *choices, _ in rows:
            ctx = f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\nQuestion: {q}\nAnswer:"
            ref = reference_choice_lls(mor_model, tok, ctx, choices)
            preds.append(int(np.argmax(ref)))
            got = res.samples[len(preds) - 1]["loglikelihoods"]
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    gold = [[r[5] for r in rows] for rows in MMLU_ROWS.values()]
    gold = ["ABCD".index(g) for gs in gold for g in gs]
    assert res.metrics["acc"] == pytest.approx(np.mean([p == g for p, g in zip(preds, gold)]))


# -- the suite and its average -----------------------------------------------------------------
def test_paper_suite_and_metrics():
    assert expand_suites(["paper"]) == ["lambada", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "mmlu"]
    assert expand_suites(["piqa", "paper"])[0] == "piqa" and len(expand_suites(["piqa", "paper"])) == 7
    assert set(SUITES["paper"]) == set(PAPER_METRICS)
    for name, metric in PAPER_METRICS.items():  # every column's metric is one the task computes
        assert metric in get_task(name).metrics
    # byte-normalised except LAMBADA, WinoGrande and MMLU
    assert {t for t, m in PAPER_METRICS.items() if m != "acc_bytes"} == {"lambada", "winogrande", "mmlu"}


def fake(task: str, **metrics: float) -> TaskResult:
    return TaskResult(task, 10, 0, 1234, dict(metrics), 0.0)


def test_arc_counts_once_in_the_average():
    res = {"lambada": fake("lambada", acc=0.3, perplexity=40.0), "hellaswag": fake("hellaswag", acc=0.2, acc_norm=0.9, acc_bytes=0.4),
           "piqa": fake("piqa", acc=0.1, acc_norm=0.9, acc_bytes=0.6), "winogrande": fake("winogrande", acc=0.5),
           "arc_easy": fake("arc_easy", acc=0.1, acc_norm=0.9, acc_bytes=0.7), "arc_challenge": fake("arc_challenge", acc=0.1, acc_norm=0.9, acc_bytes=0.3),
           "mmlu": fake("mmlu", acc=0.25)}
    s = paper_summary(res)
    assert list(s["columns"]) == ["lambada", "hellaswag", "piqa", "winogrande", "arc", "mmlu"] and s["complete"]
    assert s["columns"]["arc"]["value"] == pytest.approx(0.5) and s["columns"]["arc"]["metric"] == "acc_bytes"
    assert s["average"] == pytest.approx((0.3 + 0.4 + 0.6 + 0.5 + 0.5 + 0.25) / 6)
    assert suite_average({"piqa": 0.6, "arc_easy": 0.7, "arc_challenge": 0.3}) == pytest.approx(0.55)
    assert suite_average({"arc_easy": 0.7}) == pytest.approx(0.7) and math.isnan(suite_average({}))


def test_sweep_average_rows_count_arc_once():
    base = {"run": "r", "step": 1, "checkpoint": "c", "tokens": None, "flops": None, "stderr": 0.0, "n": 4}
    rows = [{**base, "task": t, "metric": m, "value": v} for t, m, v in [
        ("piqa", "acc", 0.1), ("piqa", "acc_bytes", 0.6), ("arc_easy", "acc_bytes", 0.7), ("arc_challenge", "acc_bytes", 0.3),
        ("piqa@topk", "acc_bytes", 0.8), ("arc_easy@topk", "acc_bytes", 0.2), ("ppl:x", "token_nll", 3.0)]]
    avg = {r["task"]: r["value"] for r in average_rows(rows)}
    assert avg == {"fewshot_avg": pytest.approx(0.55), "fewshot_avg@topk": pytest.approx(0.5)}


# -- top-k routing -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arc_requests(tok, shared_data):
    task = get_task("arc_easy")
    pairs = [encode_pair(tok, c, x, tok.eos_id) for d in task.load(shared_data)[:6] for c, x in task.requests(d)]
    return [ScoreRequest(c + x, len(x)) for c, x in pairs]


def test_topk_scorer_is_a_per_request_topk_forward(mor_model, tok, arc_requests):
    """Batched top-k scores equal each request run alone with top-k routing (no pad takes part in a
    row's top-k), and differ from causal scores (the routing really changed)."""
    assert len({len(r.tokens) for r in arc_requests}) > 3
    got = Scorer(mor_model, batch_size=len(arc_requests), pad_id=tok.eos_id, routing="topk").score_requests(arc_requests)
    causal = Scorer(mor_model, batch_size=len(arc_requests), pad_id=tok.eos_id).score_requests(arc_requests)
    for r, g in zip(arc_requests, got):
        ids = torch.tensor([list(r.tokens)])
        with torch.no_grad():
            logits = mor_model(ids[:, :-1], causal_routing=False).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-r.n_score:]
        np.testing.assert_allclose(g.logprobs, ref.numpy(), atol=2e-5, rtol=0)
    assert max(float(np.abs(g.logprobs - c.logprobs).max()) for g, c in zip(got, causal)) > 1e-3


def test_paper_suite_cli_reports_topk_beside_causal(tmp_path, mor_checkpoint, spm_path, data_dir):
    out = tmp_path / "r" / "paper.json"
    payload = load_tool("fewshot").main([
        "--checkpoint", str(mor_checkpoint), "--tokenizer", str(spm_path), "--tasks", "paper", "--mmlu-dir", str(write_mmlu(tmp_path / "mmlu")),
        "--limit", "2", "--routing", "topk", "--data-dir", str(data_dir), "--out", str(out), "--no-progress"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(payload, default=str))
    assert set(data["results"]) == set(data["results_topk"]) == set(SUITES["paper"])
    assert all(r["routing"] == "causal" for r in data["results"].values())
    assert all("non-causal" in r["routing"] for r in data["results_topk"].values())
    causal, topk = data["paper"]["causal"], next(v for k, v in data["paper"].items() if "non-causal" in k)
    assert causal["complete"] and topk["complete"]
    arc = (data["results"]["arc_easy"]["metrics"]["acc_bytes"] + data["results"]["arc_challenge"]["metrics"]["acc_bytes"]) / 2
    assert causal["columns"]["arc"]["value"] == pytest.approx(arc)
    md = out.with_suffix(".md").read_text()
    assert "non-causal" in md and "| mmlu | 2 | 0 | acc |" in md and "average" in md


def test_full_sets_unless_limited():
    args = load_tool("fewshot").parse(["--checkpoint", "x", "--tasks", "paper"])
    assert args.limit is None and args.routing == "causal"


def test_markdown_table_labels_non_causal_rows():
    md = markdown_table({"piqa": TaskResult("piqa", 3, 0, 1, {"acc": 0.5}, 0.0, routing="topk")})
    assert "routing" in md.splitlines()[0] and "non-causal" in md.splitlines()[2]
    assert "routing" not in markdown_table({"piqa": fake("piqa", acc=0.5)})


def test_sweep_topk_beside_causal_and_mmlu(tmp_path, mor_checkpoint, spm_path, data_dir):
    from megamor.eval.sweep import Sweep, SweepConfig, discover, item_key

    mmlu = write_mmlu(tmp_path / "mmlu")
    cfg = SweepConfig(tasks=["arc_easy", "mmlu"], limit=2, batch_size=8, data_dir=str(data_dir), tokenizer=str(spm_path),
                      mmlu_dir=str(mmlu), routing="topk")
    ids = [t for t, _ in cfg.items()]
    assert ids == ["arc_easy", "arc_easy@topk", "mmlu", "mmlu@topk"]
    # the causal items' cache keys are those of a sweep without --routing: old caches stay valid
    plain = dict(SweepConfig(tasks=["arc_easy"], limit=2, batch_size=8, data_dir=str(data_dir), tokenizer=str(spm_path)).items())
    assert item_key("arc_easy", dict(cfg.items())["arc_easy"]) == item_key("arc_easy", plain["arc_easy"])
    s = Sweep(cfg, tmp_path / "sweep")
    ckpts = discover([mor_checkpoint])
    s.run(ckpts, progress=False)
    rows, missing = s.rows(ckpts)
    assert not missing
    val = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert ("mmlu@topk", "acc") in val and ("arc_easy@topk", "acc_bytes") in val
    assert val[("fewshot_avg", "avg")] == pytest.approx((val[("arc_easy", "acc_bytes")] + val[("mmlu", "acc")]) / 2)
    assert val[("fewshot_avg@topk", "avg")] == pytest.approx((val[("arc_easy@topk", "acc_bytes")] + val[("mmlu@topk", "acc")]) / 2)


def test_study_fewshot_avg_counts_arc_once(mor_model, spm_path, data_dir):
    """The study table's few-shot average (megamor.study.evaluate) is the suite average: ARC-Easy and
    ARC-Challenge one column, not two."""
    from megamor.study.config import StudyEvalConfig
    from megamor.study.evaluate import fewshot

    res = fewshot(mor_model, spm_path, StudyEvalConfig(fewshot_tasks=["piqa", "arc_easy", "arc_challenge"], fewshot_limit=5,
                                                       fewshot_data_dir=str(data_dir)))
    v = {k: r["value"] for k, r in res["fewshot"].items()}
    assert {r["metric"] for r in res["fewshot"].values()} == {"acc_bytes"}
    arc = (v["arc_easy"] + v["arc_challenge"]) / 2
    assert v["piqa"] != pytest.approx(arc)  # else counting ARC once or twice gives the same average
    assert res["fewshot_avg"] == pytest.approx((v["piqa"] + arc) / 2)


def test_mmlu_shots_are_the_first_dev_examples_of_the_documents_subject(tmp_path):
    """lm-eval's MMLU takes the first k dev examples of the same subject (its first_n sampler); the
    harness drew k at random from every subject's dev examples, under another subject's header."""
    import random

    from megamor.eval.harness import fewshot_prefix

    rows = {s: rs + [[f"{s} extra {i}?", "a", "b", "c", "d", "A"] for i in range(3)] for s, rs in MMLU_ROWS.items()}
    folder = write_mmlu(tmp_path / "mmlu", rows)
    for split in ("dev",):  # dev: every row of each subject (write_mmlu keeps one)
        for subject, rs in rows.items():
            with open(folder / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(rs)
    task = get_task("mmlu", path=folder)
    pool, docs = task.load_fewshot(), task.load()
    for i, doc in enumerate(docs):
        prefix = fewshot_prefix(task, i, doc, pool, 2, seed=random.randint(0, 99), same_split=False)
        mine = [d for d in pool if d["subject"] == doc["subject"]][:2]
        assert prefix == "".join(task.fewshot_example(d) + task.fewshot_delimiter for d in mine)
