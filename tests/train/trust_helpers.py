"""Damaging checkpoints the way a disk, a person or an attacker would, for the trust tests."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import torch

from megamor.runs import integrity
from megamor.runs.safe_load import load as safe_load

# The file kinds of a ZeRO-1 tag, by what they hold.
FILE_KINDS = {
    "model": "mp_rank_00_model_states.pt",
    "optim": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "trainer": "trainer_state.pt",
}


def flip_tensor_byte(path: Path) -> None:
    """Same-size corruption: flip one exponent bit of the first value of the file's largest
    tensor storage (a torch zip stores storages uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        offset = info.header_offset + 30 + name_len + extra_len + 3
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x20]))
    assert path.stat().st_size == size


class Payload:
    """Unpickling this runs `touch target` (what a planted checkpoint would do, but harmless)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def plant_payload(path: Path, target: Path) -> None:
    """Add a code-running object to a checkpoint file and re-sign the tag's marker, as an
    attacker who can write the run folder would: only the loader can stop it."""
    obj = safe_load(path)
    obj["payload"] = Payload(target)
    torch.save(obj, path)
    resign(path)


def resign(path: Path) -> None:
    tag = path.parent
    meta = json.loads((tag / integrity.MARKER).read_text())
    meta["files"][path.name] = path.stat().st_size
    meta["hashes"][path.name] = integrity.hash_file(path)
    (tag / integrity.MARKER).write_text(json.dumps(meta))
