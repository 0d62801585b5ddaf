"""Read what W&B logged offline: the run-*.wandb file is a LevelDB-style log of protobuf
records (32 KiB blocks, 7-byte headers: crc32, length, type). wandb 0.31 ships no Python
reader, so this small one lets tests check history rows without a network."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B log"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + HEADER])
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


def history(path: Path) -> list[dict]:
    """Every logged row as {key: value} (values JSON-decoded), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                name = item.key or "/".join(item.nested_key)
                row[name] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_id(path: Path) -> str | None:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    return None


def exit_code(path: Path) -> int | None:
    """The exit code the run's `finish` recorded (None: no exit record, the file was cut short)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "exit":
            return rec.exit.exit_code
    return None
