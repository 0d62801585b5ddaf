"""Decoding caches.

One entry per *attention site* (a virtual layer: a physical layer at one point of the unrolled
stack). Recursion-wise caching: the site of step r holds keys/values only of tokens that ran
step r, so a token at step r attends to earlier tokens that also reached step r. Recursive KV
sharing: only the first recursion's sites hold entries; later steps read them.

Each append adds the same number of slots to every row of the batch; slots of rows whose token
did not run the site are marked invalid and masked out (a batch of one stores only what ran).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megamor.model.layers import KVBlock, TokenMeta


class KVCache:
    def __init__(self, batch_size: int, device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.entries: dict[int, KVBlock] = {}
        # Next absolute position of each row (prompts may be left-padded).
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Whether each row has seen any real token yet (positions of left padding stay 0).
        self.seen_tokens = 0

    def append(self, site: int, k: Tensor, v: Tensor, meta: TokenMeta) -> KVBlock:
        valid = meta.valid if meta.valid is not None else torch.ones_like(meta.positions, dtype=torch.bool)
        new = KVBlock(k, v, TokenMeta(meta.positions, valid, meta.doc_ids))
        old = self.entries.get(site)
        if old is not None:
            doc = None
            if old.meta.doc_ids is not None and new.meta.doc_ids is not None:
                doc = torch.cat([old.meta.doc_ids, new.meta.doc_ids], 1)
            new = KVBlock(
                torch.cat([old.k, k], 2),
                torch.cat([old.v, v], 2),
                TokenMeta(
                    torch.cat([old.meta.positions, meta.positions], 1),
                    torch.cat([old.meta.valid, valid], 1),  # type: ignore[list-item]
                    doc,
                ),
            )
        self.entries[site] = new
        return new

    def get(self, site: int) -> KVBlock | None:
        return self.entries.get(site)

    def nbytes(self, valid_only: bool = True) -> int:
        """Bytes of keys+values held; valid_only counts only slots of tokens that ran a site."""
        total = 0
        for e in self.entries.values():
            per_slot = 2 * e.k.shape[1] * e.k.shape[3] * e.k.element_size()
            slots = int(e.meta.valid.sum()) if (valid_only and e.meta.valid is not None) else e.k.shape[0] * e.k.shape[2]
            total += slots * per_slot
        return total
