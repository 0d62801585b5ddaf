"""verify_shards and the reader's own checks: truncated, corrupted, out-of-range, bad index."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from megamor.data.dataset import PackedDataset, ShardSet
from megamor.data.errors import ShardError
from megamor.data.verify import verify_shards

from .conftest import run_tool


@pytest.fixture
def shards(tmp_path, shakespeare_shards):
    out = tmp_path / "s"
    shutil.copytree(shakespeare_shards, out)
    return out


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _fix_sha(folder, name):
    m = _manifest(folder)
    for split in m["splits"].values():
        for s in split["shards"]:
            if s["file"] == name:
                s["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            if s["docs_file"] == name:
                s["docs_sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


def test_good_folder_verifies(shards):
    r = verify_shards(shards)
    m = _manifest(shards)
    assert r.tokens == {s: m["splits"][s]["tokens"] for s in ("train", "valid")}
    assert r.shards == sum(len(m["splits"][s]["shards"]) for s in m["splits"]) and r.shards > 5
    p = run_tool("verify_shards.py", str(shards))
    assert "OK" in p.stdout


def test_truncated_shard_is_named(shards):
    victim = shards / "train-00002.npy"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"train-00002.npy: (shard )?is truncated"):
        verify_shards(shards)
    with pytest.raises(ShardError, match=r"train-00002.npy: truncated"):
        ShardSet(shards, "train")
    p = run_tool("verify_shards.py", str(shards), check=False)
    assert p.returncode == 1 and "train-00002.npy" in p.stderr and "Traceback" not in p.stderr


def test_corrupted_shard_is_named(shards):
    victim = shards / "train-00001.npy"
    data = bytearray(victim.read_bytes())
    data[500] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00001.npy: sha256 differs"):
        verify_shards(shards)
    header = shards / "train-00003.npy"
    data = bytearray(header.read_bytes())
    data[0:6] = b"XXXXXX"  # not an .npy any more, same size
    header.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00003.npy: shard is corrupted"):
        verify_shards(shards, check_hashes=False)


def test_missing_shard_and_manifest(shards):
    (shards / "valid-00000.npy").unlink()
    with pytest.raises(ShardError, match=r"valid-00000\.npy.*missing"):
        verify_shards(shards)
    (shards / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        verify_shards(shards)


def test_token_id_out_of_range_is_located(shards):
    m = _manifest(shards)
    vocab = m["tokenizer"]["vocab_size"]
    arr = np.load(shards / "train-00001.npy", mmap_mode="r+")
    arr[1234] = vocab + 5
    arr.flush()
    del arr
    _fix_sha(shards, "train-00001.npy")  # only the range check can catch it now
    n0 = m["splits"]["train"]["shards"][0]["tokens"]
    with pytest.raises(ShardError, match=rf"train-00001.npy: token id {vocab + 5} at offset 1234 \(token {n0 + 1234} of split 'train'\) is >= vocab size {vocab}"):
        verify_shards(shards)
    ds = PackedDataset(ShardSet(shards, "train"), 64)
    window = (n0 + 1234) // 64
    with pytest.raises(ShardError, match=rf"token id {vocab + 5} >= vocab size {vocab} in .*train-00001.npy at offset 1234"):
        ds.windows(np.array([window]))
    ds.windows(np.array([window + 2]))  # other windows still read


def test_document_index_disagreeing_with_eos_is_caught(shards):
    docs = np.load(shards / "train-00000.docs.npy")
    docs[3] += 1
    np.save(shards / "train-00000.docs.npy", docs)
    _fix_sha(shards, "train-00000.docs.npy")
    with pytest.raises(ShardError, match=r"train-00000.docs.npy: document index disagrees .*entry 3"):
        verify_shards(shards)
