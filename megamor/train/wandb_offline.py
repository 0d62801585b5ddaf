"""W&B's offline run files, read back, and the rows a resumed run owes W&B.

A run-<id>.wandb file is a LevelDB-style log of protobuf records (32 KiB blocks, 7-byte
headers: crc32, length, type); wandb ships no Python reader. W&B's service writes whole blocks,
so a killed run loses the tail of its file: rows that metrics.jsonl holds and W&B never gets.
A resumed run therefore sends W&B the rows of metrics.jsonl up to its checkpoint that W&B does
not have (`rows_owed`): after the last step the earlier offline files of the run hold, or online
before the run's `starting_step` (the server's next step). What W&B cannot do is forget: a
killed run's rows after the checkpoint stay there (W&B ignores a step below its current one),
where metrics.jsonl and TensorBoard show the resumed run's values (docs/observability.md)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megamor.runs.metrics_log import iter_rows

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path) -> Iterator[bytes]:
    """The records' bytes, in order; a torn tail (a killed writer) ends the iteration."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):
            return
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if rtype == FULL:
            yield chunk
        elif rtype == FIRST:
            pending = chunk
        elif rtype == MIDDLE:
            pending += chunk
        elif rtype == LAST:
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # noqa: BLE001  a damaged record: the file's readable part is what W&B has
            return
        yield rec


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged row as {key: value} (values JSON-decoded), in order."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item})
    return rows


def run_id(path: Path) -> str | None:
    return next((rec.run.run_id for rec in records(path) if rec.WhichOneof("record_type") == "run"), None)


def exit_code(path: Path) -> int | None:
    """The exit code the run's `finish` recorded (None: no exit record, the file was cut short)."""
    return next((rec.exit.exit_code for rec in records(path) if rec.WhichOneof("record_type") == "exit"), None)


def last_offline_step(wandb_dir: Path, run: str, skip: Path | None = None) -> int:
    """The highest step the earlier offline files of run `run` hold (-1: none); `skip`: the
    current attempt's own folder."""
    last = -1
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run}/run-{run}.wandb")):
        if skip is not None and path.parent.resolve() == skip.resolve():
            continue
        steps = [int(r["_step"]) for r in history(path) if isinstance(r.get("_step"), (int, float))]
        last = max([last, *steps])
    return last


def rows_owed(metrics: Path, after: int, upto: int) -> list[tuple[int, dict[str, Any]]]:
    """(step, metrics) of metrics.jsonl's rows with after < step <= upto, without the values it
    could not hold (null) and the histograms (their edges are not in the file)."""
    out = []
    for row in iter_rows(metrics):
        try:
            step = int(row["step"])
        except (KeyError, TypeError, ValueError):
            continue
        if after < step <= upto:
            out.append((step, {k: v for k, v in row.items()
                               if k not in ("step", "time") and v is not None and not k.endswith("/counts")}))
    return out
