"""tokenize_and_shard end to end on real corpora: round trip, determinism, kill/resume, task split."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megamor.data.dataset import ShardSet
from megamor.data.demo_corpus import write_demo_corpus
from megamor.data.errors import DataError, OutputExistsError
from megamor.data.finalize import finalize
from megamor.data.pipeline import ShardSettings, tokenize_and_shard
from megamor.data.readers import ReadOptions, ReadStats, iter_documents
from megamor.data.shards import token_dtype
from megamor.data.sources import plan_units, resolve_sources
from megamor.data.tokenize_units import is_valid_doc
from megamor.data.tokenizer import Tokenizer

from .conftest import REPO, outputs, run_tool

QUIET = {"progress": False, "log": lambda m: None}
SETTINGS = {"shard_tokens": 100_000, "valid_fraction": 0.02, "split_seed": 7}


def expected_documents(inputs: list[str], opts: ReadOptions | None = None) -> list[str]:
    opts = opts or ReadOptions()
    sources, _ = resolve_sources(inputs)
    docs: list[str] = []
    for u in plan_units(sources, opts.txt_mode, 1 << 62, 1 << 62):
        docs += iter_documents(sources[u.source], u, opts, ReadStats())
    return docs


def shard_documents(folder: Path, split: str, tok: Tokenizer) -> list[str]:
    ss = ShardSet(folder, split)
    tokens = ss.tokens(0, ss.num_tokens)
    starts = ss.doc_starts(0, ss.num_tokens)
    ends = np.append(starts[1:], ss.num_tokens)
    assert np.all(tokens[ends - 1] == tok.eos_id)  # every document ends with EOS
    return [tok.decode(tokens[a : b - 1].tolist()) for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, small_books) -> list[str]:
    """Real books (whole-file units) plus a jsonl that splits into many byte-range units."""
    d = tmp_path_factory.mktemp("mixed")
    write_demo_corpus(d / "demo.jsonl", seed=1, target_bytes=600_000)
    return [*small_books, str(d / "demo.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mixed_inputs, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("reference")
    tokenize_and_shard(mixed_inputs, out, tokenizer_dir, ShardSettings(**SETTINGS, unit_bytes=1 << 17), workers=1, **QUIET)
    return out


@pytest.fixture(scope="module")
def books_shards(tmp_path_factory, all_books, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("books")
    tokenize_and_shard(all_books, out, tokenizer_dir, ShardSettings(**SETTINGS), workers=2, **QUIET)
    return out


def test_detokenized_shards_reproduce_the_real_books(books_shards, all_books, tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    docs = expected_documents(all_books)
    want = {"train": [], "valid": []}
    for d in docs:
        want["valid" if is_valid_doc(d.encode(), 7, 0.02) else "train"].append(d)
    assert len(want["valid"]) > 100 and len(want["train"]) > 10_000
    for split in ("train", "valid"):
        got = shard_documents(books_shards, split, tok)
        assert got == want[split], split
    m = json.loads((books_shards / "manifest.json").read_text())
    assert m["stats"]["documents"] == len(docs)
    assert m["dtype"] == "uint16" and m["tokenizer"]["hash"] == tok.content_hash
    assert all(sh["tokens"] == 100_000 for sh in m["splits"]["train"]["shards"][:-1])
    assert [s["path"] for s in m["sources"]] == all_books


def test_same_output_for_reruns_workers_and_unit_sizes(reference, mixed_inputs, tokenizer_dir, tmp_path):
    ref = outputs(reference)
    assert len([n for n in ref if n.startswith("train-") and not n.endswith(".docs.npy")]) >= 5
    for i, (workers, unit_bytes) in enumerate([(1, 1 << 17), (2, 1 << 17), (2, 50_000)]):
        out = tmp_path / f"run{i}"
        tokenize_and_shard(mixed_inputs, out, tokenizer_dir, ShardSettings(**SETTINGS, unit_bytes=unit_bytes),
                           workers=workers, **QUIET)
        assert outputs(out) == ref, (workers, unit_bytes)


def test_split_into_three_tasks_then_merge_equals_single_task(reference, mixed_inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "tasks"
    settings = ShardSettings(**SETTINGS, unit_bytes=1 << 17)
    for i in (2, 0):
        r = tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, num_tasks=3, task_index=i, **QUIET)
        assert r.manifest is None and r.units_done > 0
    with pytest.raises(DataError, match=r"units are not tokenized yet \(e\.g\. unit"):
        finalize(out)
    tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, num_tasks=3, task_index=1, **QUIET)
    assert not (out / "manifest.json").exists()
    run_tool("merge_shards.py", str(out))  # the real merge entry point
    assert outputs(out) == outputs(reference)
    assert not (out / "parts").exists()


def test_sigkill_midway_then_rerun_gives_identical_output(books_shards, all_books, tokenizer_dir, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, str(REPO / "data_prep" / "tokenize_and_shard.py"), *all_books, "--tokenizer", str(tokenizer_dir),
            "--out", str(out), "--workers", "1", "--shard-tokens", "100000", "--valid-fraction", "0.02",
            "--split-seed", "7", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = len(list((out / "parts").glob("*.json")))
    assert 3 <= done_before < 10
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert f"({done_before} reused)" in p.stderr
    assert outputs(out) == outputs(books_shards)
    assert not any(n.startswith(".") for n in os.listdir(out))  # no temp files left


def test_partial_shard_and_stale_temps_are_not_taken_for_complete(reference, mixed_inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "damaged"
    settings = ShardSettings(**SETTINGS, unit_bytes=1 << 17)
    tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, **QUIET)
    (out / "manifest.json").unlink()  # as if killed during finalize
    shard = out / "train-00001.npy"
    shard.write_bytes(shard.read_bytes()[: 1000])  # a partial shard under the final name
    (out / ".train-00002.npy.tmp-123-abc").write_bytes(b"junk")
    tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, **QUIET)
    assert outputs(out) == outputs(reference)
    assert not (out / ".train-00002.npy.tmp-123-abc").exists()


def test_output_folder_of_another_run_is_refused(reference, mixed_inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "o"
    settings = ShardSettings(**SETTINGS, unit_bytes=1 << 17)
    tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, **QUIET)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, **QUIET)  # same run: a no-op
    assert r.units_done == 0 and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = ShardSettings(**{**SETTINGS, "valid_fraction": 0.1}, unit_bytes=1 << 17)
    with pytest.raises(OutputExistsError, match=r"another run's manifest \(settings.valid_fraction: 0.02 -> 0.1\)"):
        tokenize_and_shard(mixed_inputs, out, tokenizer_dir, other, **QUIET)
    with pytest.raises(OutputExistsError, match="another run's manifest"):
        tokenize_and_shard(mixed_inputs[:1], out, tokenizer_dir, settings, **QUIET)
    r = tokenize_and_shard(mixed_inputs, out, tokenizer_dir, other, overwrite=True, **QUIET)
    assert r.manifest["settings"]["valid_fraction"] == 0.1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty and is not a tokenize_and_shard folder"):
        tokenize_and_shard(mixed_inputs, foreign, tokenizer_dir, settings, **QUIET)
    with pytest.raises(DataError, match="overwrite with --num-tasks"):
        tokenize_and_shard(mixed_inputs, out, tokenizer_dir, settings, num_tasks=2, overwrite=True, **QUIET)
    # What another array task may be writing at the same moment is not foreign.
    racing = tmp_path / "racing"
    (racing / "parts").mkdir(parents=True)
    (racing / ".plan.json.tmp-99-abcdef12").write_text("{")
    r = tokenize_and_shard(mixed_inputs, racing, tokenizer_dir, settings, num_tasks=2, task_index=0, **QUIET)
    assert r.units_done > 0
    # Shards whose plan and manifest are gone: refused (a full shard of the right size was reused,
    # silently mixing the old corpus into the new one), and --out naming a file is one line.
    stale = tmp_path / "stale"
    shutil.copytree(out, stale)
    for name in ("manifest.json", "plan.json"):
        (stale / name).unlink()
    with pytest.raises(OutputExistsError, match=r"holds shards \(train-00000.docs.npy, train-00000.npy.*but no plan.json or manifest.json"):
        tokenize_and_shard(mixed_inputs[:1], stale, tokenizer_dir, settings, **QUIET)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile: exists and is not a folder"):
        tokenize_and_shard(mixed_inputs, tmp_path / "afile", tokenizer_dir, settings, **QUIET)


def test_bad_input_counts_reach_the_manifest(tmp_path, tokenizer_dir):
    j = tmp_path / "in.jsonl"
    lines = [b'{"text": "good one"}', b'{"text": ""}', b"garbage", b'{"text": "caf\xe9"}', b'{"other": 1}', b'{"text": "ok"}']
    j.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{j}:3: not JSON"):
        tokenize_and_shard([str(j)], tmp_path / "a", tokenizer_dir, **QUIET)
    r = tokenize_and_shard([str(j)], tmp_path / "b", tokenizer_dir,
                           ShardSettings(read=ReadOptions(skip_bad_lines=True), valid_fraction=0.0), **QUIET)
    st = r.manifest["stats"]
    assert (st["documents"], st["empty_skipped"], st["bad_lines_skipped"], st["replaced_chars"]) == (3, 1, 2, 1)
    tok = Tokenizer.load(tokenizer_dir)
    assert shard_documents(tmp_path / "b", "train", tok) == ["good one", "caf\ufffd", "ok"]


def test_valid_split_is_by_document_and_keeps_duplicates_together(tmp_path, tokenizer_dir):
    docs = [f"document {i} " * 3 for i in range(400)]
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs))  # every document twice
    r = tokenize_and_shard([str(j)], tmp_path / "o", tokenizer_dir, ShardSettings(valid_fraction=0.25), **QUIET)
    tok = Tokenizer.load(tokenizer_dir)
    train, valid = shard_documents(tmp_path / "o", "train", tok), shard_documents(tmp_path / "o", "valid", tok)
    assert not set(train) & set(valid) and set(train) | set(valid) == set(docs)
    assert 0.15 < len(valid) / 800 < 0.35 and len(valid) % 2 == 0
    assert r.manifest["splits"]["valid"]["documents"] == len(valid)


def test_documents_longer_than_a_shard(tmp_path, small_books, tokenizer_dir):
    """Whole-file documents spanning many shards: shards without a document start verify, read back."""
    from megamor.data.verify import verify_shards

    out = tmp_path / "long"
    tokenize_and_shard(small_books, out, tokenizer_dir, ShardSettings(shard_tokens=20_000, valid_fraction=0.0,
                       read=ReadOptions(txt_mode="file")), **QUIET)
    m = json.loads((out / "manifest.json").read_text())
    docs_per_shard = [s["documents"] for s in m["splits"]["train"]["shards"]]
    assert len(docs_per_shard) > 10 and docs_per_shard.count(0) > 8 and sum(docs_per_shard) == 2
    verify_shards(out)
    tok = Tokenizer.load(tokenizer_dir)
    assert shard_documents(out, "train", tok) == expected_documents(small_books, ReadOptions(txt_mode="file"))


def test_token_dtype_by_vocab_size():
    assert token_dtype(2000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128_256) == np.uint32


def test_memory_stays_bounded_as_input_grows(tmp_path, tokenizer_dir, small_books):
    """Peak RSS of a run on a 10x larger single-unit (compressed) input barely grows."""
    import zstandard

    block = "".join(json.dumps({"text": p}) + "\n" for p in Path(small_books[0]).read_text().split("\n\n")).encode()
    rss = {}
    for copies in (1, 10):
        src = tmp_path / f"x{copies}.jsonl.zst"
        with open(src, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
            for _ in range(copies):
                w.write(block)
        code = ("import resource, sys; from megamor.data.pipeline import tokenize_and_shard, ShardSettings\n"
                "if __name__ == '__main__':\n"
                f"    tokenize_and_shard([{str(src)!r}], {str(tmp_path / f'o{copies}')!r}, {str(tokenizer_dir)!r},"
                " ShardSettings(shard_tokens=1 << 20), progress=False, log=lambda m: None)\n"
                "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        assert p.returncode == 0, p.stderr
        rss[copies] = int(p.stdout.split()[-1]) / 1024  # MiB
    tokens = json.loads((tmp_path / "o10" / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert tokens > 2_500_000
    # Holding the tokens as a Python list would cost ~8 bytes x tokens (> 20 MiB) more; allow 12.
    assert rss[10] - rss[1] < 12, rss


def test_valid_files_hold_out_whole_books(tmp_path, small_books, tokenizer_dir):
    """--txt-mode file + --valid-files: each book is one document, the named book is the valid split."""
    shakespeare, frankenstein = small_books
    opts = ReadOptions(txt_mode="file")
    r = tokenize_and_shard(small_books, tmp_path / "o", tokenizer_dir,
                           ShardSettings(valid_fraction=0.0, read=opts, valid_files=(frankenstein,)), **QUIET)
    tok = Tokenizer.load(Path(tokenizer_dir) / "tokenizer.model")
    train_doc, valid_doc = expected_documents([shakespeare], opts), expected_documents([frankenstein], opts)
    assert len(train_doc) == len(valid_doc) == 1
    for split, doc in (("train", train_doc[0]), ("valid", valid_doc[0])):
        assert r.manifest["splits"][split]["documents"] == 1
        tokens = np.concatenate([np.load(p) for p in sorted((tmp_path / "o").glob(f"{split}-*.npy"))
                                 if not p.name.endswith(".docs.npy")])
        assert tokens.tolist() == tok.encode(doc) + [tok.eos_id]  # the whole book, then EOS
    assert r.manifest["settings"]["valid_files"] == [str(Path(frankenstein).resolve())]
    with pytest.raises(DataError, match="names every input"):
        tokenize_and_shard([frankenstein], tmp_path / "p", tokenizer_dir,
                           ShardSettings(valid_files=(frankenstein,)), **QUIET)
