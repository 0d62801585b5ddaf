"""Routing refactors change no number: training, evaluation and decoding of tiny MoR models
equal a fingerprint stored from the code before the refactor (tests/model/routing_reference.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model import routing_reference as ref


@pytest.mark.parametrize("name", sorted(ref.VARIANTS))
def test_routing_paths_equal_the_stored_reference(name):
    want = json.loads(ref.PATH.read_text())[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = json.loads(json.dumps(ref.fingerprint(name)))  # the same float round trip as the file
    finally:
        torch.set_num_threads(threads)
    for key in sorted(want):
        assert got[key] == want[key], f"{name}: {key} differs from the stored reference"
