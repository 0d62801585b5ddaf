"""Errors raised by the data pipeline; every message names the file (and line or offset)."""

from __future__ import annotations


class DataError(Exception):
    """Bad input data or a bad shard folder. The message says where (file:line, shard name)."""


class ShardError(DataError):
    """A shard that is missing, truncated, corrupted or disagrees with its manifest."""


class OutputExistsError(DataError):
    """The output folder holds another run's files; pass --overwrite to replace them."""


class DataStateError(DataError):
    """A loader state that cannot be resumed on the current data (fingerprint, seed, seq_len...)."""
