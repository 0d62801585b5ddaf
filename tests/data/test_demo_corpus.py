"""The synthetic demo corpus: deterministic, fast, and its answers are right."""

from __future__ import annotations

import itertools
import json
import re
import time

from megamor.data.demo_corpus import KINDS, World, generate, write_demo_corpus


def test_deterministic_fast_and_sized(tmp_path):
    t0 = time.time()
    counts = write_demo_corpus(tmp_path / "a.jsonl", seed=0, target_bytes=2_000_000)
    assert time.time() - t0 < 10
    write_demo_corpus(tmp_path / "b.jsonl", seed=0, target_bytes=2_000_000)
    write_demo_corpus(tmp_path / "c.jsonl", seed=1, target_bytes=2_000_000)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() and a != (tmp_path / "c.jsonl").read_bytes()
    rows = [json.loads(line) for line in a.decode().splitlines()]
    text_bytes = sum(len(r["text"].encode()) + 1 for r in rows)
    assert 2_000_000 <= text_bytes < 2_010_000
    assert set(counts) == set(KINDS) and all(counts[k] > 50 for k in KINDS)


def test_answers_are_correct_and_marked():
    world = World(0)
    capitals = {c["name"]: c["capital"] for c in world.countries}
    checked = {"arithmetic": 0, "qa": 0, "sequence": 0}
    for doc in generate(seed=0, target_bytes=300_000):
        spans = [doc.text[s:e] for s, e in doc.answers]
        assert all(spans) and (bool(spans) == (doc.kind != "prose"))
        if doc.kind == "arithmetic":
            for m in re.finditer(r"(\d+) ([-+*]) (\d+) = (\d+)", doc.text):
                x, op, y, r = int(m[1]), m[2], int(m[3]), int(m[4])
                assert r == {"+": x + y, "-": x - y, "*": x * y}[op]
                assert m[4] in spans
                checked["arithmetic"] += 1
        elif doc.kind == "qa":
            for m in re.finditer(r"Q: What is the capital of (\w+)\?\nA: (\w+)", doc.text):
                assert capitals[m[1]] == m[2]
                checked["qa"] += 1
        elif doc.kind == "sequence":
            for line in doc.text.split("\n"):
                nums = [int(x) for x in re.findall(r"\d+", line)]
                assert len(set(np_diff(nums))) == 1
                checked["sequence"] += 1
    assert all(v > 20 for v in checked.values()), checked


def np_diff(xs):
    return [b - a for a, b in itertools.pairwise(xs)]


def test_prepare_demo_data_builds_then_reuses(tmp_path):
    from megamor.data.dataset import ShardSet
    from megamor.data.demo_data import prepare_demo_data

    d = prepare_demo_data(tmp_path, mb=0.5, vocab_size=1024, log=lambda m: None)
    n = ShardSet(d.shards, "train").num_tokens
    assert n > 100_000 and ShardSet(d.shards, "valid").num_tokens > 0
    stamps = {p: p.stat().st_mtime_ns for p in (d.corpus, d.tokenizer, d.shards / "train-00000.npy")}
    again = prepare_demo_data(tmp_path, mb=0.5, vocab_size=1024, log=lambda m: None)
    assert again == d and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    bigger = prepare_demo_data(tmp_path, mb=0.6, vocab_size=1024, log=lambda m: None)
    assert ShardSet(bigger.shards, "train").num_tokens > n
