"""Aggregate metrics and their standard errors (the same formulas as lm-eval where it has one)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean(xs: Sequence[float]) -> float:
    return float(np.mean(np.asarray(xs, dtype=np.float64))) if len(xs) else float("nan")


def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean with the n-1 sample variance (lm-eval's `mean_stderr`)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    return float(np.std(np.asarray(xs, dtype=np.float64), ddof=1) / math.sqrt(n))


def perplexity_of_mean_ll(lls: Sequence[float]) -> float:
    """lm-eval's `perplexity` aggregation: exp(-mean log-likelihood) over examples."""
    return math.exp(-mean(lls))


def perplexity_stderr(lls: Sequence[float]) -> float:
    """Delta method: se(exp(-m)) = exp(-m) se(m). (lm-eval bootstraps this; values agree closely.)"""
    return perplexity_of_mean_ll(lls) * mean_stderr(lls)


def argmax_first(xs: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (as numpy's argmax, which lm-eval uses)."""
    return int(np.argmax(np.asarray(xs, dtype=np.float64)))
