"""Hit rates and paired comparisons of hits: what a count like "9/12" can and cannot claim.

- :func:`rate_interval`: a proportion with its 95% Wilson score interval (Wilson 1927; better coverage
  than the normal approximation at small n and near 0 or 1, narrower than Clopper-Pearson).
- :func:`paired_hits_test`: two methods scored on the same samples compared by the exact McNemar test,
  a two-sided binomial test on the discordant pairs (only the samples one method hits and the other
  misses carry information; McNemar 1947).
- :func:`sign_test`: the exact two-sided sign test on paired continuous scores (ties dropped), for
  per-sample values such as deletion-curve areas.
- :func:`above_chance`: a one-sided binomial test of ``hits`` against a chance rate.

scipy's ``binomtest`` does the arithmetic; these functions fix the conventions (p = 1 with no
informative pair) and the words a verdict may use (:func:`comparison_words`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from medctl.io import MISSING, format_number

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Rate:
    """``hits / n`` with its Wilson interval (NaNs when ``n`` is 0)."""

    hits: int
    n: int
    rate: float
    low: float
    high: float

    def text(self) -> str:
        """``9/12 = 0.75 [0.47, 0.91]``; ``—`` without samples."""
        if not self.n:
            return "—"
        return f"{self.hits}/{self.n} = {self.rate:.2f} [{self.low:.2f}, {self.high:.2f}]"


def rate_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> Rate:
    """``hits`` of ``n`` with the Wilson score interval at ``confidence``."""
    if n <= 0:
        return Rate(0, 0, math.nan, math.nan, math.nan)
    interval = stats.binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Rate(int(hits), int(n), hits / n, float(interval.low), float(interval.high))


@dataclass(frozen=True)
class PairedTest:
    """Two sets of hits on the same ``n`` samples: hits of each, the discordant pairs, the exact p."""

    n: int
    hits: int  # the method's
    other_hits: int  # what it is compared with
    only_method: int  # samples the method hits and the other misses
    only_other: int
    p: float  # two-sided

    def to_dict(self) -> dict:
        return asdict(self)


def paired_hits_test(method: Sequence[bool], other: Sequence[bool]) -> PairedTest:
    """Exact McNemar test of two hit vectors over the same samples (p = 1 when no pair disagrees)."""
    a, b = np.asarray(method, dtype=bool), np.asarray(other, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired hits need the same samples: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return PairedTest(len(a), int(a.sum()), int(b.sum()), only_a, only_b, sign_test_counts(only_a, only_b))


def sign_test_counts(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of ``wins`` against ``losses`` at one half; 1 when both are 0."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def fewest_pairs_to_decide(alpha: float) -> int:
    """The fewest samples on which an exact paired test (McNemar, sign test) can reach ``p < alpha``: every
    one of them won by the same side, two-sided p = 2 * 0.5**k. 6 at alpha 0.05 (p = 0.031; 5 give 0.0625)."""
    pairs = 1
    while sign_test_counts(pairs, 0) >= alpha:
        pairs += 1
    return pairs


@dataclass(frozen=True)
class SignTest:
    """Paired scores ``x`` vs ``y``: how often ``x`` is lower, higher, the median difference and the p."""

    n: int  # pairs that differ
    lower: int
    higher: int
    median_difference: float  # median of x - y over every finite pair
    p: float

    def to_dict(self) -> dict:
        return asdict(self)


def sign_test(x: Sequence[float], y: Sequence[float]) -> SignTest:
    """Exact two-sided sign test of paired ``x`` and ``y`` (ties and NaN pairs dropped)."""
    x_, y_ = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x_) & np.isfinite(y_)
    diff = x_[keep] - y_[keep]  # (n,)
    lower, higher = int((diff < 0).sum()), int((diff > 0).sum())
    median = float(np.median(diff)) if len(diff) else math.nan
    return SignTest(lower + higher, lower, higher, median, sign_test_counts(lower, higher))


def above_chance(hits: int, n: int, chance: float) -> float:
    """One-sided exact binomial p that ``hits`` of ``n`` exceed the rate ``chance`` (1 without samples)."""
    if n <= 0 or chance != chance:
        return 1.0
    chance = min(max(float(chance), 1e-12), 1 - 1e-12)  # binomtest needs 0 < p < 1
    return float(stats.binomtest(int(hits), int(n), chance, alternative="greater").pvalue)


def p_cell(p: float | None) -> str:
    """A p-value as a table cell: ``0.031``, ``<0.001``, ``—`` where no test ran."""
    if p is None or p != p:
        return MISSING
    return "<0.001" if p < 0.001 else format_number(p)


def format_p(p: float | None) -> str:
    """``p = 0.031``; ``p < 0.001``; ``p = —``."""
    cell = p_cell(p)
    return f"p < {cell[1:]}" if cell.startswith("<") else f"p = {cell}"


def comparison_words(test: PairedTest, name: str, alpha: float) -> tuple[str, str]:
    """``("beats", "beats random weights (9/12 vs 2/12, p = 0.016)")``: the outcome, one of ``beats``,
    ``below`` and ``not distinguishable``, and the phrase a verdict uses."""
    counts = f"{test.hits}/{test.n} vs {test.other_hits}/{test.n}, {format_p(test.p)}"
    if test.p < alpha and test.only_method > test.only_other:
        return "beats", f"beats {name} ({counts})"
    if test.p < alpha:
        return "below", f"significantly below {name} ({counts})"
    return "not distinguishable", f"not distinguishable from {name} ({counts})"
