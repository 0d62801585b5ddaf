"""Preallocated per-site KV storage for the decoding engine.

One tensor pair per attention site that owns keys/values (sites that reuse another site's
keys under recursive KV sharing own none), shaped [slots, Hkv, capacity, hd]. Each request
slot writes its tokens' keys at the next free index of that site, so a site only ever holds
the tokens that ran it: with recursion-wise caching a deep recursion step's site holds the
few tokens routed that deep, and its capacity starts at the step's share of `max_len`
(the router's capacity c_r) instead of the full length.

The host keeps every slot's fill level per site (it learns which tokens ran a site from the
routing it reads back anyway), so writes never concatenate and attention reads only up to
the longest fill among the rows in the batch. A site grows (doubling, one copy) only when a
slot would overflow it, which is rare once capacities are calibrated.

The static-shape step (`graph_step`, CUDA graphs) keeps the fill levels on the device instead;
`fill` (host) and `fill_dev` (device) are synchronised lazily, whichever side changed last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from megamor.model.layers import KVBlock, TokenMeta


class StaticKVCache:
    def __init__(
        self,
        site_shares: dict[int, float],
        slots: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        margin: int = 16,
    ):
        """site_shares: fraction of a sequence each owning site is expected to hold (1.0 for
        prelude/coda and full-capacity steps, c_r for routed steps)."""
        self.slots, self.max_len = slots, max_len
        self.kv_shape = (n_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self._fill: dict[int, np.ndarray] = {}
        self._fill_dev: dict[int, Tensor] = {}
        self._stale = ""  # "host" or "dev": which copy of the fill levels is out of date
        self.generation = 0  # bumps when storage is reallocated (captured graphs must be redone)
        # Benchmarks time the key/value writes apart (the paper reports decoding without them);
        # timing synchronises the device around every write, so it is off unless asked for.
        self.time_writes = False
        self.write_wall = self.write_cpu = 0.0
        for site, share in site_shares.items():
            cap = min(max_len, math.ceil(share * max_len) + margin)
            self.k[site] = self._alloc(cap)
            self.v[site] = self._alloc(cap)
            self._fill[site] = np.zeros(slots, dtype=np.int64)
            self._fill_dev[site] = torch.zeros(slots, dtype=torch.long, device=self.device)

    # -- fill levels, host and device ------------------------------------------------------
    @property
    def fill(self) -> dict[int, np.ndarray]:
        """Host fill levels (read back from the device if the device changed them last)."""
        if self._stale == "host":
            for site, f in self._fill_dev.items():
                self._fill[site][:] = f.cpu().numpy()
            self._stale = ""
        return self._fill

    def host_changed(self) -> None:
        self._stale = "dev"

    @property
    def fill_dev(self) -> dict[int, Tensor]:
        if self._stale == "dev":
            for site, f in self._fill.items():
                self._fill_dev[site].copy_(torch.from_numpy(f))
            self._stale = ""
        return self._fill_dev

    def device_changed(self) -> None:
        self._stale = "host"

    def snapshot_dev(self) -> dict[int, Tensor]:
        return {s: f.clone() for s, f in self.fill_dev.items()}

    def restore_dev(self, snap: dict[int, Tensor]) -> None:
        for s, f in snap.items():
            self._fill_dev[s].copy_(f)
        self._stale = "host"

    def _alloc(self, cap: int) -> Tensor:
        return torch.zeros(self.slots, self.kv_shape[0], cap, self.kv_shape[1], dtype=self.dtype, device=self.device)

    def capacity(self, site: int) -> int:
        return self.k[site].shape[2]

    def _ensure(self, site: int, need: int) -> None:
        cap = self.capacity(site)
        if need <= cap:
            return
        # Grow by a quarter (a routed step rarely overshoots its share by much), and never past
        # max_len unless a request really is longer; then by a quarter again, not one token at a
        # time (each growth copies the site and, on a GPU, recaptures the graphs).
        step = cap + max(16, cap // 4)
        new_cap = max(need, min(self.max_len, step) if need <= self.max_len else step)
        self.generation += 1
        for store in (self.k, self.v):
            grown = self._alloc(new_cap)
            grown[:, :, :cap] = store[site]
            store[site] = grown

    # -- writes ------------------------------------------------------------------------
    def _to_device(self, values: np.ndarray, memo: dict | None) -> Tensor:
        """Host ints on the device; `memo` reuses one copy for equal values within a step (the
        sites of one layer group share fill levels, so a step copies a few arrays, not one per
        layer)."""
        key = values.tobytes()
        if memo is not None and key in memo:
            return memo[key]
        t = torch.from_numpy(values).to(self.device, non_blocking=True)
        if memo is not None:
            memo[key] = t
        return t

    def write_token(self, site: int, rows: np.ndarray, rows_t: Tensor, k: Tensor, v: Tensor, memo: dict | None = None) -> None:
        """Append one token per row: k, v [m, Hkv, 1, hd] for slots `rows` (host and device)."""
        if self.time_writes:
            self._sync()
            t, c = time.perf_counter(), time.process_time()
        fill = self.fill[site]
        at = fill[rows]
        self._ensure(site, int(at.max()) + 1)
        at_t = self._to_device(at, memo)
        self.k[site][rows_t, :, at_t] = k[:, :, 0].to(self.dtype)
        self.v[site][rows_t, :, at_t] = v[:, :, 0].to(self.dtype)
        fill[rows] = at + 1
        self.host_changed()
        if self.time_writes:
            self._sync()
            self.write_wall += time.perf_counter() - t
            self.write_cpu += time.process_time() - c

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def write_prefill(self, site: int, rows: Sequence[int], k: Tensor, v: Tensor, valid: Tensor) -> None:
        """Store a prefill's keys/values [n, Hkv, T, hd] for fresh slots `rows`, keeping only
        the valid entries of each row, in positional order (the order they arrive in)."""
        T = k.shape[2]
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid first
        counts = valid.sum(1).cpu().numpy()
        self._ensure(site, T)
        idx = order[:, None, :, None].expand(-1, self.kv_shape[0], -1, self.kv_shape[1])
        rows_t = torch.as_tensor(list(rows), device=self.device)
        self.k[site][rows_t, :, :T] = k.gather(2, idx).to(self.dtype)
        self.v[site][rows_t, :, :T] = v.gather(2, idx).to(self.dtype)
        self.fill[site][list(rows)] = counts
        self.host_changed()

    def release(self, slot: int) -> None:
        for fill in self.fill.values():
            fill[slot] = 0
        self.host_changed()

    # -- static-shape writes and reads (no host reads: CUDA-graph capturable) ---------------
    def full_rows(self, site: int, idx: Tensor) -> Tensor:
        """[m] bool: the slots `idx` whose storage at `site` is full (a write would overflow)."""
        return self.fill_dev[site][idx] >= self.capacity(site)

    def write_masked(self, site: int, idx: Tensor, write: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append k, v [m, Hkv, 1, hd] for the slots idx [m] (distinct) where write [m]; returns
        whether a writing slot was full (overflow). A full slot never writes: its last entry is a
        real key, which the redo after an overflow still needs; the rows that do not write
        rewrite what they hold."""
        fill = self.fill_dev[site]
        cap = self.capacity(site)
        level = fill[idx]
        full = level >= cap
        overflow = (write & full).any()
        write = write & ~full
        at = level.clamp(max=cap - 1)
        for store, new in ((self.k[site], k), (self.v[site], v)):
            old = store[idx, :, at]
            store[idx, :, at] = torch.where(write[:, None, None], new[:, :, 0].to(store.dtype), old)
        fill[idx] = level + write.long()
        return overflow

    def view_masked(self, site: int, idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v [m, Hkv, capacity, hd], mask [m, 1, 1, capacity]) of the slots idx (None: all),
        masked by fill level; a slot holding nothing attends to anything (a finite, unused output)."""
        k, v = self.k[site], self.v[site]
        if idx is not None:
            k, v = k[idx], v[idx]
        lens = self.fill_dev[site] if idx is None else self.fill_dev[site][idx]
        mask = torch.arange(k.shape[2], device=k.device).unsqueeze(0) < lens.unsqueeze(1)
        mask = mask | (lens == 0).unsqueeze(1)
        return k, v, mask[:, None, None, :]

    def grow_full(self, sites: Sequence[int]) -> list[int]:
        """Grow each of `sites` that is full in some slot (after a static step's overflow);
        returns the sites grown."""
        grown = []
        for site in sites:
            cap = self.capacity(site)
            if int(self.fill[site].max()) >= cap:
                self._ensure(site, cap + 1)
                grown.append(site)
        return grown

    # -- reads -------------------------------------------------------------------------
    def view(self, site: int, rows: np.ndarray, rows_t: Tensor, memo: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v [m, Hkv, L, hd], mask [m, 1, 1, L]) of slots `rows`, L = their longest fill."""
        fill = self.fill[site][rows]
        L = int(fill.max())
        first = int(rows[0])
        if int(rows[-1]) - first + 1 == len(rows) and bool((rows[1:] > rows[:-1]).all()):
            k = self.k[site][first : first + len(rows), :, :L]  # a contiguous run of slots: a view, no copy
            v = self.v[site][first : first + len(rows), :, :L]
        else:  # index_select copies only the rows' first L entries, ~4x faster than k[rows_t, :, :L]
            k = self.k[site][:, :, :L].index_select(0, rows_t)
            v = self.v[site][:, :, :L].index_select(0, rows_t)
        key = ("mask", fill.tobytes())
        if memo is not None and key in memo:
            return k, v, memo[key]
        lens = self._to_device(fill, memo)
        mask = (torch.arange(L, device=self.device).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        if memo is not None:
            memo[key] = mask
        return k, v, mask

    # -- accounting ----------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        return 2 * self.kv_shape[0] * self.kv_shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def tokens_held(self) -> dict[int, int]:
        """Tokens stored per owning site, over all slots."""
        return {site: int(f.sum()) for site, f in self.fill.items()}

    def nbytes(self) -> int:
        """Bytes of keys+values of the tokens held (what the cache really needs)."""
        return sum(self.tokens_held().values()) * self.bytes_per_token()

    def reserved_bytes(self) -> int:
        """Bytes allocated (capacities x slots)."""
        return sum(t.numel() * t.element_size() for store in (self.k, self.v) for t in store.values())


class PrefillRecorder:
    """Stands in for `KVCache` during a prefill through `MoRLM.forward`: it hands each site
    the keys/values of this call (a prefill starts from empty caches) and records them, so
    the engine can copy them into its static storage. Prefill therefore runs the model's own
    forward pass, the same computation `generate()` does."""

    def __init__(self, batch_size: int, device: torch.device | str):
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.entries: dict[int, KVBlock] = {}

    def append(self, site: int, k: Tensor, v: Tensor, meta: TokenMeta) -> KVBlock:
        valid = meta.valid if meta.valid is not None else torch.ones_like(meta.positions, dtype=torch.bool)
        block = KVBlock(k, v, TokenMeta(meta.positions, valid, meta.doc_ids))
        self.entries[site] = block
        return block

    def get(self, site: int) -> KVBlock | None:
        return self.entries.get(site)
