"""The index-free shuffle and the weighted interleaving."""

from __future__ import annotations

import numpy as np
import pytest

from megamor.data.blend import Blend
from megamor.data.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 255, 256, 257, 1000, 65_537])
def test_permutation_is_a_bijection(n):
    v = Permutation(n, key=12345)(np.arange(n))
    assert np.array_equal(np.sort(v), np.arange(n))


def test_permutation_depends_on_key_and_looks_shuffled():
    n = 100_000
    a, b = Permutation(n, 1)(np.arange(n)), Permutation(n, 2)(np.arange(n))
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # no trend with position
    assert np.mean(np.abs(np.diff(a))) > n / 5  # neighbours land far apart
    big = Permutation(10**12, 3)
    idx = np.array([0, 1, 10**12 - 1])
    assert np.array_equal(big(idx), big(idx)) and np.all(big(idx) < 10**12)
    with pytest.raises(IndexError):
        Permutation(10, 1)(np.array([10]))


def test_blend_prefixes_track_the_weights():
    w = [0.6, 0.25, 0.1, 0.05]
    b = Blend(w)
    src, j = b.lookup(np.arange(3 * b.period))
    for n in (100, 1000, 10_000, b.period + 777, 3 * b.period):
        counts = np.bincount(src[:n], minlength=4)
        assert np.all(np.abs(counts - np.array(w) * n) <= 2), n
    for k in range(4):  # index within a source counts up with no gap or repeat
        assert np.array_equal(j[src == k], np.arange((src == k).sum()))
    assert np.array_equal(b.consumed(12_345), np.bincount(src[:12_345], minlength=4))
    with pytest.raises(ValueError):
        Blend([1.0, 0.0])
