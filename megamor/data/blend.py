"""Deterministic weighted interleaving of several sources, and the global sample order.

Blend: within each block of `period` samples, source k gets c_k = round(w_k * period) slots
(largest remainder; so shares are exact to 1/period, ~1.5e-5, and a weight below that is
refused), spread evenly (its i-th slot at time (i + 0.5) / c_k; ties by source
index), so any prefix of the order is within about one sample per source of its target share.
The block repeats, so sample n's source and its index within that source are O(1) to compute.

Order: a source's j-th sample is window perm_{seed, source, epoch}(j mod W) of epoch j // W, a
fresh permutation per epoch: within an epoch of a source no window repeats or is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megamor.data.permutation import Permutation, hash_ints

DEFAULT_PERIOD = 1 << 16


class Blend:
    def __init__(self, weights: Sequence[float], period: int = DEFAULT_PERIOD):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        w = w / w.sum()
        self.weights = w
        if len(w) == 1:
            period = 1
        ideal = w * period
        counts = np.floor(ideal).astype(np.int64)
        for k in np.argsort(-(ideal - counts), kind="stable")[: period - counts.sum()]:
            counts[k] += 1
        if np.any(counts == 0):
            raise ValueError(f"{list(weights)}: a weight below 1/{period} of the total gets no sample "
                             f"(each block of {period} samples gives every source at least one)")
        self.period, self.counts = period, counts
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        src = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
        order = np.lexsort((src, times))
        self.pattern = src[order]
        self.rank = np.empty(period, dtype=np.int64)
        for k in range(len(counts)):
            self.rank[self.pattern == k] = np.arange(counts[k])

    def consumed(self, samples: int) -> np.ndarray:
        """How many of the first `samples` global samples each source supplied."""
        block, rem = divmod(samples, self.period)
        return block * self.counts + np.bincount(self.pattern[:rem], minlength=len(self.counts))

    def lookup(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source) of global samples n."""
        block, pos = np.divmod(np.asarray(n, dtype=np.int64), self.period)
        src = self.pattern[pos]
        return src, block * self.counts[src] + self.rank[pos]


class GlobalOrder:
    """Global sample n -> (source, window), a pure function of (seed, window counts, weights)."""

    def __init__(self, window_counts: Sequence[int], weights: Sequence[float], seed: int):
        if any(c < 1 for c in window_counts):
            raise ValueError(f"every source needs at least one window, got {list(window_counts)}")
        self.window_counts = np.asarray(window_counts, dtype=np.int64)
        self.blend = Blend(weights)
        self.seed = seed
        self._perms: dict[tuple[int, int], Permutation] = {}

    def _perm(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        p = self._perms.get(key)
        if p is None:
            if len(self._perms) > 64:
                self._perms.clear()
            p = self._perms[key] = Permutation(int(self.window_counts[source]), hash_ints(self.seed, source, epoch))
        return p

    def lookup(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src, j = self.blend.lookup(n)
        epoch, pos = np.divmod(j, self.window_counts[src])
        window = np.empty_like(pos)
        for s, e in sorted(set(zip(src.tolist(), epoch.tolist()))):
            sel = (src == s) & (epoch == e)
            window[sel] = self._perm(s, e)(pos[sel])
        return src, window

    def epochs(self, samples: int) -> list[float]:
        """Epochs of each source consumed by the first `samples` global samples."""
        return [round(c / w, 6) for c, w in zip(self.blend.consumed(samples).tolist(), self.window_counts.tolist())]
