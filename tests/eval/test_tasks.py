"""Task loaders: whole real files with the published example counts, bad input, prompts, k-shot."""

from __future__ import annotations

import json

import pytest

from megamor.eval.harness import fewshot_prefix
from megamor.eval.tasks import TASKS, TaskDataError, get_task

COUNTS = {
    "hellaswag": 10042,
    "piqa": 1838,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "winogrande": 1267,
    "lambada": 5153,
    "boolq": 3270,
    "openbookqa": 500,
}


def test_every_task_has_a_count():
    assert set(COUNTS) == set(TASKS) - {"mmlu"}  # MMLU is not in the shared data: tests/eval/test_paper.py


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_loader_reads_whole_file(name, data_dir):
    task = get_task(name)
    docs = task.load(data_dir)
    assert len(docs) == COUNTS[name]
    for d in docs[:: max(1, len(docs) // 50)]:
        assert ":" in d["_src"]
        reqs = task.requests(d)
        assert reqs and all(isinstance(c, str) and isinstance(x, str) and x for c, x in reqs)
        if task.kind != "loglikelihood":
            gold = task.doc_to_target(d)
            assert 0 <= gold < len(task.doc_to_choices(d))


def test_gold_label_distributions_are_plausible(data_dir):
    # A loader that mis-parsed labels would put them all in one class.
    for name in ("hellaswag", "piqa", "winogrande", "arc_easy", "boolq"):
        task = get_task(name)
        golds = [task.doc_to_target(d) for d in task.load(data_dir)]
        counts = {g: golds.count(g) for g in set(golds)}
        assert len(counts) >= 2 and max(counts.values()) < 0.7 * len(golds), (name, counts)


def test_prompts_match_lm_eval_conventions(data_dir):
    d = get_task("hellaswag").load(data_dir)[0]
    assert d["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert get_task("hellaswag").requests(d)[3] == (d["query"], " starts pulling up roofing on a roof.")
    wg = get_task("winogrande")
    w = wg.load(data_dir)[0]
    assert wg.requests(w) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert wg.doc_to_target(w) == 1
    lam = get_task("lambada")
    ctx, cont = lam.requests(lam.load(data_dir)[0])[0]
    assert cont == " signs" and ctx.endswith("I don't care about")


def test_hellaswag_original_jsonl_matches_lm_eval_preprocessing(tmp_path):
    from lm_eval.tasks.hellaswag.utils import preprocess  # lm-eval's own cleaning function

    rows = [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
         "ctx_b": "then", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."], "label": "3"},
        {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a spot.", "ctx_b": "you", "endings": ["[step] water them.", "a", "b [title] c", "d"], "label": 0},
    ]
    p = tmp_path / "hellaswag_val.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = get_task("hellaswag", path=p).load()
    for r, d in zip(rows, docs):
        assert d["query"] == preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        assert d["choices"] == [preprocess(e) for e in r["endings"]]
        assert d["label"] == int(r["label"])


# -- bad input ---------------------------------------------------------------------------
def test_missing_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task file not found: .*nope\.jsonl"):
        get_task("piqa", path=tmp_path / "nope.jsonl").load()
    with pytest.raises(KeyError, match="unknown task 'hellaswagg'"):
        get_task("hellaswagg")


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "arc.jsonl"
    good = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "A"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"id": "broken", "question": \n')
    with pytest.raises(TaskDataError, match=rf"^{p}:3: invalid JSON"):
        get_task("arc_easy", path=p).load()
    bad_key = dict(good, answerKey="E")
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad_key) + "\n")
    with pytest.raises(TaskDataError, match=rf"^{p}:2: answerKey 'E' is not one of"):
        get_task("arc_easy", path=p).load()


def test_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "dev.jsonl"
    p.write_text('{"question": "q", "passage": "p", "answer": true}\n{"question": "q", "passage": "p"}\n')
    with pytest.raises(TaskDataError, match=rf"^{p}:2: missing field 'answer'"):
        get_task("boolq", path=p).load()


def test_hellaswag_six_line_errors(tmp_path):
    p = tmp_path / "hs.txt"
    block = "Label: ctx\n1\na\nb\nc\nd\n"
    p.write_text(block + "Label: ctx\nx\na\nb\nc\nd\n")
    with pytest.raises(TaskDataError, match=rf"^{p}:8: gold label must be 0-3"):
        get_task("hellaswag", path=p).load()
    p.write_text(block + "Label: ctx\n2\na\n")
    with pytest.raises(TaskDataError, match=rf"^{p}:7: incomplete example"):
        get_task("hellaswag", path=p).load()


def test_label_file_mismatches(tmp_path):
    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 3)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(TaskDataError, match="2 labels for 3 examples"):
        get_task("piqa", path=tmp_path / "valid.jsonl").load()
    (tmp_path / "valid-labels.lst").write_text("0\n1\n7\n")
    with pytest.raises(TaskDataError, match=r"valid-labels.lst:3: label must be one of"):
        get_task("piqa", path=tmp_path / "valid.jsonl").load()
    w = tmp_path / "dev.jsonl"
    w.write_text('{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}\n{"sentence": "no blank", "option1": "x", "option2": "y", "answer": "2"}\n')
    with pytest.raises(TaskDataError, match=rf"^{w}:2: sentence must contain exactly one '_'"):
        get_task("winogrande", path=w).load()
    w.write_text('{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}\n')
    (tmp_path / "dev-labels.lst").write_text("2\n")
    with pytest.raises(TaskDataError, match=r"dev-labels.lst:1: label '2' disagrees with answer '1'"):
        get_task("winogrande", path=w).load()


# -- k-shot ------------------------------------------------------------------------------
def test_kshot_is_seeded_excludes_the_doc_and_ignores_order(data_dir):
    task = get_task("piqa")
    docs = task.load(data_dir)[:30]
    a = [fewshot_prefix(task, i, d, docs, 3, seed=1, same_split=True) for i, d in enumerate(docs)]
    b = [fewshot_prefix(task, i, d, docs, 3, seed=1, same_split=True) for i, d in enumerate(docs)]
    c = [fewshot_prefix(task, i, d, docs, 3, seed=2, same_split=True) for i, d in enumerate(docs)]
    assert a == b and a != c
    assert fewshot_prefix(task, 7, docs[7], docs, 3, seed=1, same_split=True) == a[7]  # per-doc, not sequential
    for i, d in enumerate(docs):
        assert a[i].count("\n\n") == 3 and f"Question: {d['goal']}\nAnswer:" not in a[i]
        shots = [s for s in docs if f"Question: {s['goal']}\nAnswer: {task.doc_to_choices(s)[s['label']]}\n\n" in a[i]]
        assert len(shots) == 3  # each shot is solved with its gold answer


def test_arc_shots_come_from_the_dev_file(data_dir):
    task = get_task("arc_easy")
    pool = task.load_fewshot(data_dir)
    assert pool is not None and len(pool) == 570
    doc = task.load(data_dir)[0]
    prefix = fewshot_prefix(task, 0, doc, pool, 2, seed=0, same_split=False)
    assert sum(f"Question: {s['question']['stem']}\n" in prefix for s in pool) == 2
