"""The statistics the report states, in one place so every table follows the same conventions.

- ± is the sample standard deviation (ddof 1): the spread a reader should expect from one more seed or
  network, not the (smaller) population std of the values at hand.
- Two sets of results are compared pairwise (same distillation seed, same test networks) with a two-sided
  paired t-test, and a difference is called real ("separated") only when p < 0.05 over at least 3 pairs:
  with 2 pairs the test has one degree of freedom and says little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
MIN_PAIRS = 3


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1); 0.0 for fewer than two values (no spread measured, e.g. a single
    evaluation network)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class PairedDifference:
    """`a - b` over `n` pairs: the differences' mean and sample std, and the two-sided paired t-test's p-value
    (NaN when the test is undefined: fewer than two pairs, or every difference the same)."""

    n: int
    mean: float
    std: float
    p_value: float

    @property
    def verdict(self) -> str:
        """'separated' only when p < ALPHA over at least MIN_PAIRS pairs, else 'not separated'."""
        return "separated" if self.n >= MIN_PAIRS and self.p_value < ALPHA else "not separated"


def paired_difference(a: Sequence[float], b: Sequence[float] | float) -> PairedDifference:
    """`a[i] - b[i]` tested against 0 (`scipy.stats.ttest_rel`). `b` may be one number, e.g. a baseline
    scored once and compared with each distillation seed: the test is then a one-sample t-test of `a - b`.

    Equal differences have no spread, so no t statistic: p is NaN (not 0) and the verdict 'not separated'.
    No pairs at all is an error.
    """
    a = np.asarray(a, dtype=float)
    if not len(a):
        raise ValueError("paired_difference: no pairs")
    b = np.broadcast_to(np.asarray(b, dtype=float), a.shape)
    differences = a - b
    p_value = math.nan
    if len(differences) >= 2 and not np.allclose(differences, differences[0]):
        p_value = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(len(differences), float(differences.mean()), sample_std(differences), p_value)
