"""Checkpoint integrity pieces of megamor.runs in one process: content hashes, quarantine
instead of deletion, pruning, the weights-only loader, RNG state. (End-to-end trust tests with
real training runs: tests/train/test_checkpoint_trust.py.)"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from megamor.runs import integrity
from megamor.runs.consolidate import consolidated_state_dict
from megamor.runs.layout import CheckpointError, NoValidCheckpointError, tag_for
from megamor.runs.resume import find_resumable
from megamor.runs.safe_load import UnsafeCheckpointError, safe_torch_load
from megamor.runs.safe_load import load as safe_load
from megamor.runs.save import CheckpointManager, rng_state, set_rng_state
from megamor.runs.tags import resolve_tag
from tests.train.trust_helpers import Payload


def real_tag(run, step, payload=None):
    """A ZeRO-0-like tag with a hashed marker, as CheckpointManager writes it."""
    d = run / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    obj = {"module": {"w": torch.arange(4.0) + step}}
    if payload is not None:
        obj["payload"] = payload
    torch.save(obj, d / "mp_rank_00_model_states.pt")
    (d / "experiment.yaml").write_text("name: t\n")
    names = integrity.tag_files(d)
    sizes = {n: (d / n).stat().st_size for n in names}
    meta = {"step": step, "zero_stage": 0, "dp_world_size": 1, "precision": "fp32",
            **integrity.marker_payload(sizes, {n: integrity.hash_file(d / n) for n in names})}
    (d / integrity.MARKER).write_text(json.dumps(meta))
    return d


def test_hash_catches_a_same_size_flip_that_sizes_miss(tmp_path):
    d = real_tag(tmp_path, 2)
    f = d / "experiment.yaml"
    f.write_text("name: u\n")  # same size, other bytes
    assert integrity.check_tag(d, "size")[0] is not None
    meta, why = integrity.check_tag(d, "hash")
    assert meta is None and why == "experiment.yaml does not match its content hash (corrupted since it was written)"
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 70000)  # > 2 blocks of 8 MiB: streamed hash = one-shot hash
    import xxhash

    assert integrity.hash_file(big) == xxhash.xxh3_128(big.read_bytes()).hexdigest()


def test_prune_quarantines_partial_tags_and_deletes_only_complete_ones(tmp_path):
    for s in (2, 4, 6):
        real_tag(tmp_path, s)
    partial = tmp_path / "checkpoints" / tag_for(5)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    (tmp_path / "checkpoints" / tag_for(6) / integrity.MARKER).unlink()  # intact files, marker lost
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.prune(keep=real_tag(tmp_path, 8))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [tag_for(4), tag_for(8)]
    q = root / integrity.QUARANTINE
    assert (q / tag_for(5) / "mp_rank_00_model_states.pt").read_bytes() == b"half"
    assert (q / tag_for(6) / "mp_rank_00_model_states.pt").is_file()
    assert json.loads((q / f"{tag_for(6)}.json").read_text())["reason"].startswith("no COMPLETE marker")
    assert dict(integrity.quarantined(root)).keys() == {tag_for(5), tag_for(6)}


def test_quarantine_never_overwrites(tmp_path):
    d = real_tag(tmp_path, 2)
    first = integrity.quarantine(d, "one")
    again = integrity.quarantine(real_tag(tmp_path, 2), "two")
    assert first.name == tag_for(2) and again.name == f"{tag_for(2)}.1" and first.is_dir() and again.is_dir()


def partial_tag(run, step):
    d = run / "checkpoints" / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"half")
    return d


def test_a_folder_where_no_save_finished_starts_over_but_a_damaged_complete_tag_refuses(tmp_path):
    run = tmp_path / "fresh"
    partial_tag(run, 2)
    assert find_resumable(run, "hash") is None  # nothing ever completed: step 0, tag kept aside
    assert (run / "checkpoints" / integrity.QUARANTINE / tag_for(2) / "mp_rank_00_model_states.pt").is_file()
    partial_tag(run, 2)  # killed in the first save again
    assert find_resumable(run, "hash") is None

    aside = tmp_path / "set_aside"  # started over on purpose, then killed in the new first save
    integrity.quarantine(real_tag(aside, 4), integrity.SET_ASIDE)
    partial_tag(aside, 2)
    assert find_resumable(aside, "hash") is None

    damaged = tmp_path / "damaged"  # a save that completed once and was damaged since: refuse
    d = real_tag(damaged, 4)
    (d / "experiment.yaml").write_text("name: u\n")
    partial_tag(damaged, 6)
    with pytest.raises(NoValidCheckpointError, match="does not match its content hash"):
        find_resumable(damaged, "hash")
    partial_tag(damaged, 8)  # the same folder later: the damaged tag quarantined earlier still counts
    with pytest.raises(NoValidCheckpointError, match="quarantined earlier"):
        find_resumable(damaged, "hash")


def test_several_tags_without_marker_refuse_and_keep_refusing(tmp_path):
    """Issue 17: only a sole first save may lack its marker; two such tags mean saves finished
    here (markers lost): refuse, and again once they sit in quarantine/ (old code: step 0)."""
    run = tmp_path / "lost"
    partial_tag(run, 2)
    partial_tag(run, 4)
    with pytest.raises(NoValidCheckpointError, match="refusing to start over"):
        find_resumable(run, "hash")
    with pytest.raises(NoValidCheckpointError, match="quarantined earlier"):
        find_resumable(run, "hash")


def test_weights_only_loader_refuses_a_payload_and_names_the_file(tmp_path):
    sentinel = tmp_path / "pwned"
    f = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "p": Payload(sentinel)}, f)
    with pytest.raises(UnsafeCheckpointError, match=rf"{f}: refused to load.*posix.system"):
        safe_load(f)
    with safe_torch_load(), pytest.raises(UnsafeCheckpointError):  # what DeepSpeed's own calls get
        torch.load(f, weights_only=False)
    assert torch.load is not None and not sentinel.exists()
    assert torch.load.__name__ == "load"  # restored after the block


def test_consolidation_of_a_zero0_tag_refuses_a_payload(tmp_path):
    sentinel = tmp_path / "pwned"
    real_tag(tmp_path, 2, payload=Payload(sentinel))
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt: refused to load"):
        consolidated_state_dict(resolve_tag(tmp_path))
    assert not sentinel.exists()
    real_tag(tmp_path / "ok", 2)
    assert torch.equal(consolidated_state_dict(resolve_tag(tmp_path / "ok"))["w"], torch.arange(4.0) + 2)


def test_rng_state_is_plain_and_round_trips_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(safe_load(tmp_path / "s.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect
    old = {"numpy": np.random.get_state()}  # checkpoints written before: numpy arrays, allow-listed
    torch.save(old, tmp_path / "old.pt")
    assert safe_load(tmp_path / "old.pt")["numpy"][0] == "MT19937"


def test_a_missing_tag_names_the_tags_there_and_an_unpadded_step_resolves(tmp_path):
    """`export RUN --tag step_99` said "no COMPLETE marker (a save that did not finish)" for a tag
    that does not exist; step_6 now names step_00000006."""
    real_tag(tmp_path, 6)
    real_tag(tmp_path, 8)
    with pytest.raises(CheckpointError, match=r"no checkpoint step_99 in .*checkpoints \(has step_00000006, step_00000008\)"):
        resolve_tag(tmp_path, "step_99")
    assert resolve_tag(tmp_path, "step_6").step == 6
    assert resolve_tag(tmp_path, "step_00000008").step == 8
