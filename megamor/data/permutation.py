"""A seeded pseudo-random permutation of range(n) evaluated pointwise: no index array.

A balanced Feistel network over the smallest even-bit power of two >= n, with cycle walking
to stay inside [0, n). Memory is O(1) and lookup O(1) whatever n is, so shuffling a
billion windows needs no index building (the slow step Megatron caches on disk) and any
position of the order can be computed directly when resuming.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_C1, _C2, _GOLDEN = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB), 0x9E3779B97F4A7C15


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values (wraps mod 2**64)."""
    z = z ^ (z >> _U64(30))
    z = z * _C1
    z = z ^ (z >> _U64(27))
    z = z * _C2
    return z ^ (z >> _U64(31))


def hash_ints(*values: int) -> int:
    """A uint64 derived from a tuple of non-negative ints (seed, source, epoch, ...)."""
    h = np.array([0x243F6A8885A308D3], dtype=_U64)
    for v in values:
        h = mix64(h ^ np.array([(v * _GOLDEN) & 0xFFFFFFFFFFFFFFFF], dtype=_U64))
    return int(h[0])


class Permutation:
    def __init__(self, n: int, key: int, rounds: int = 6):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = _U64(bits // 2)
        self.mask = _U64((1 << (bits // 2)) - 1)
        self.keys = [_U64(hash_ints(key, r)) for r in range(rounds)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray | int) -> np.ndarray:
        x = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        y = self._encrypt(x.astype(_U64))
        out = y >= _U64(self.n)
        while out.any():  # cycle walking: terminates because the cycle through x returns to x < n
            y[out] = self._encrypt(y[out])
            out = y >= _U64(self.n)
        return y.astype(np.int64)
