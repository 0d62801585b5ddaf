"""Readers: document rules per format, normalisation, and every bad-input case."""

from __future__ import annotations

import gzip
import json
import random
import time

import pytest

from megamor.data.errors import DataError
from megamor.data.readers import ReadOptions, ReadStats, iter_documents
from megamor.data.sources import Unit, assign_units, plan_units, resolve_sources
from megamor.data.text import decode_utf8

BIG = 1 << 62


def read_all(paths, opts=None, unit_bytes=BIG, allow_empty=False):
    opts = opts or ReadOptions()
    sources, _ = resolve_sources([str(p) for p in paths], allow_empty=allow_empty)
    stats = ReadStats()
    docs = []
    for u in plan_units(sources, opts.txt_mode, unit_bytes, BIG):
        docs += list(iter_documents(sources[u.source], u, opts, stats))
    return docs, stats


def test_decode_counts_only_real_replacements():
    assert decode_utf8("h\u00e9 \ufffd".encode()) == ("h\u00e9 \ufffd", 0)  # a genuine U+FFFD is not counted
    text, n = decode_utf8(b"a\xffb\xc3(c\xe2\x82")
    assert n == 3 and text.count("\ufffd") == 3 and text.startswith("a\ufffdb")


def test_txt_modes_bom_crlf_blank_lines(tmp_path):
    p = tmp_path / "book.txt"
    p.write_bytes("\ufeffTitle line\r\nsecond line\r\n\r\n  \t \r\nPara two\r\n\r\n\r\nPara three  \n".encode())
    docs, st = read_all([p], ReadOptions(txt_mode="paragraph"))
    assert docs == ["Title line\nsecond line", "Para two", "Para three  "]
    assert st.documents == 3 and st.empty_skipped == 0
    docs, st = read_all([p], ReadOptions(txt_mode="line"))
    assert docs == ["Title line", "second line", "Para two", "Para three  "]
    assert st.empty_skipped == 4  # blank and whitespace-only lines
    docs, _ = read_all([p], ReadOptions(txt_mode="file"))
    assert docs == ["Title line\nsecond line\n\n  \t \nPara two\n\n\nPara three  \n"]


def test_non_utf8_is_replaced_and_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 au lait\n\nna\xefve \xff\xfe end\n")
    docs, st = read_all([p])
    assert docs == ["caf\ufffd au lait", "na\ufffdve \ufffd\ufffd end"]
    assert st.replaced_chars == 4
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok \xe9"}\n{"text": "fine"}\n')
    docs, st = read_all([j])
    assert docs == ["ok \ufffd", "fine"] and st.replaced_chars == 1


def test_empty_documents_skipped_and_counted(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(x) for x in [{"text": "a"}, {"text": ""}, {"text": "  \n "}, {"text": None}, {"text": "b"}]) + "\n\n")
    docs, st = read_all([j])
    assert docs == ["a", "b"]
    assert (st.documents, st.empty_skipped, st.blank_lines) == (2, 3, 1)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: input not found"):
        resolve_sources([str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl: input file is empty"):
        resolve_sources([str(empty)])
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    sources, skipped = resolve_sources([str(empty), str(good)], allow_empty=True)
    assert [s.path for s in sources] == [str(good)] and skipped == [str(empty)]
    with pytest.raises(DataError, match="no non-empty inputs"):
        resolve_sources([str(empty)], allow_empty=True)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported input type"):
        resolve_sources([str(tmp_path / "x.csv")])


def test_folder_expands_sorted(tmp_path):
    for name in ("b.txt", "a.jsonl", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "x\n")
    sources, _ = resolve_sources([str(tmp_path)])
    assert [s.path for s in sources] == [str(tmp_path / n) for n in ("a.jsonl", "b.txt", "sub/c.txt")]


def _jsonl(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_bad_jsonl_line_errors_with_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(50)]
    lines[36] = '{"text": "unterminated'
    p = _jsonl(tmp_path, lines)
    with pytest.raises(DataError, match=rf"{p}:37: not JSON"):
        read_all([p])
    # Also when the bad line lies in a unit that starts mid-file (line number found by a scan).
    with pytest.raises(DataError, match=rf"{p}:37: not JSON"):
        read_all([p], unit_bytes=100)
    lines[36] = json.dumps({"content": "no text"})
    p = _jsonl(tmp_path, lines)
    with pytest.raises(DataError, match=rf"{p}:37: no field 'text'"):
        read_all([p])
    lines[36] = json.dumps({"text": 42})
    p = _jsonl(tmp_path, lines)
    with pytest.raises(DataError, match=rf"{p}:37: field 'text' is int"):
        read_all([p])


def test_bad_jsonl_lines_skipped_under_flag(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(10)]
    lines[2], lines[7] = "not json at all", json.dumps({"body": "x"})
    p = _jsonl(tmp_path, lines)
    docs, st = read_all([p], ReadOptions(skip_bad_lines=True))
    assert len(docs) == 8 and st.bad_lines_skipped == 2
    assert st.bad_line_examples[0].startswith(f"{p}:3: not JSON") and st.bad_line_examples[1].startswith(f"{p}:8: no field")


def test_jsonl_with_bom_and_crlf(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    docs, _ = read_all([p])
    assert docs == ["first", "second"]


def test_nested_text_field(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"meta": {"body": "deep"}})])
    docs, _ = read_all([p], ReadOptions(text_field="meta.body"))
    assert docs == ["deep"]


@pytest.mark.parametrize("mode,suffix", [("jsonl", ".jsonl"), ("line", ".txt")])
def test_byte_range_units_cover_every_line_once(tmp_path, mode, suffix):
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh \u00e9\u4e2d") for _ in range(rng.randrange(1, 200))) for _ in range(400)]
    texts = [t if t.strip() else "x" for t in texts]
    p = tmp_path / f"in{suffix}"
    with open(p, "w", newline="") as f:
        f.writelines((json.dumps({"text": t}) if mode == "jsonl" else t) + ("\r\n" if i % 3 == 0 else "\n") for i, t in enumerate(texts))
    opts = ReadOptions(txt_mode="line")
    want, _ = read_all([p], opts)
    assert want == texts
    for unit_bytes in (1, 7, 64, 1000, 4099):
        got, st = read_all([p], opts, unit_bytes=unit_bytes)
        assert got == texts, unit_bytes
        assert st.input_bytes == p.stat().st_size


def test_compressed_and_parquet_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [f"document number {i}\nwith two lines \u00e9" for i in range(300)]
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": texts, "id": list(range(300))}), tmp_path / "a.parquet", row_group_size=64)
    for name in ("a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        docs, _ = read_all([tmp_path / name])
        assert docs == texts, name
    sources, _ = resolve_sources([str(tmp_path / "a.parquet")])
    assert len(plan_units(sources, "paragraph", BIG, BIG)) == 5  # one unit per row group
    with pytest.raises(DataError, match="no column 'body'"):
        read_all([tmp_path / "a.parquet"], ReadOptions(text_field="body"))


def test_saved_hf_dataset_and_offline_hub_name(tmp_path, monkeypatch):
    import datasets

    texts = [f"row {i}" for i in range(50)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    docs, _ = read_all([tmp_path / "ds"])
    assert docs == texts
    sources, _ = resolve_sources([str(tmp_path / "ds")])
    assert len(plan_units(sources, "paragraph", BIG, 16)) == 4
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources, _ = resolve_sources(["hf:someone/not-cached-corpus"])
    t0 = time.time()
    with pytest.raises(DataError, match=r"hf:someone/not-cached-corpus: cannot load .*offline mode.*save_to_disk"):
        plan_units(sources, "paragraph", BIG, BIG)
    assert time.time() - t0 < 30  # fails at once, no retry loop


def test_assign_units_partitions_work():
    rng = random.Random(1)
    units = [Unit(i, 0, 0, 1, rng.randrange(1, 1000)) for i in range(97)]
    for n in (1, 2, 3, 8):
        parts = [assign_units(units, n, i) for i in range(n)]
        names = sorted(u.index for p in parts for u in p)
        assert names == list(range(97))
        loads = [sum(u.size for u in p) for p in parts]
        assert max(loads) - min(loads) <= 1000  # greedy largest-first balance
    with pytest.raises(DataError):
        assign_units(units, 3, 3)


def _rows(n: int) -> bytes:
    return "".join(json.dumps({"text": f"row {i}: " + "lorem ipsum " * (i % 7 + 1)}) + "\n" for i in range(n)).encode()


def _lines_before_cut(truncated: bytes, decompress) -> int:
    """Independent reference: complete lines in what the truncated stream still decodes to."""
    return decompress(truncated).count(b"\n")


@pytest.mark.parametrize("comp", ["gz", "zst"])
def test_truncated_compressed_input_names_file_and_line(tmp_path, comp):
    import zlib

    import zstandard

    raw = _rows(20_000)
    if comp == "gz":
        whole = gzip.compress(raw)
        decode = lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)  # noqa: E731
    else:
        whole = zstandard.ZstdCompressor().compress(raw)
        decode = lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)  # noqa: E731
    cut = whole[: len(whole) * 2 // 3]
    p = tmp_path / f"corpus.jsonl.{comp}"
    p.write_bytes(cut)
    line = _lines_before_cut(cut, decode) + 1
    assert 1000 < line < 20_000
    with pytest.raises(DataError, match=rf"^{p}:{line}: the {comp} stream is truncated"):
        read_all([p])
    with pytest.raises(DataError, match=rf"^{p}:{line}: the {comp} stream is truncated"):
        read_all([p], ReadOptions(skip_bad_lines=True))  # a cut last line is not a "bad line" to skip
    t = tmp_path / f"book.txt.{comp}"
    t.write_bytes(cut)
    with pytest.raises(DataError, match=rf"^{t}: the {comp} stream is truncated"):
        read_all([t], ReadOptions(txt_mode="file"))


def test_multi_frame_zst_reads_every_frame(tmp_path):
    import zstandard

    raw = _rows(3000)
    half = raw.index(b"\n", len(raw) // 2) + 1
    c = zstandard.ZstdCompressor()
    p = tmp_path / "two_frames.jsonl.zst"
    p.write_bytes(c.compress(raw[:half]) + c.compress(raw[half:]))
    docs, _ = read_all([p])
    assert docs == [json.loads(line)["text"] for line in raw.decode().splitlines()]


def test_truncated_parquet_names_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(5000)]}), p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"^{p}: not a readable parquet file"):
        read_all([p])


def test_hints_name_the_cli_flags(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="pass --allow-empty-inputs to skip it"):
        resolve_sources([str(empty)])
    bad = _jsonl(tmp_path, ['{"text": "ok"}', "{oops"])
    with pytest.raises(DataError, match=r"in.jsonl:2: not JSON .*\(pass --skip-bad-lines to skip such lines\)"):
        read_all([bad])
