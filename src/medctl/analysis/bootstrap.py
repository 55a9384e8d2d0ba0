"""Percentile bootstrap confidence intervals and a paired bootstrap test, vectorised over resamples.

Resampling: each of ``n`` resamples draws N sample indices uniformly with replacement from the N
evaluated samples (numpy ``default_rng(seed)``, so a seed gives the same numbers every time). A
resample on which the metric is undefined (AUROC of a resample holding a single class) is skipped and
counted: every result says how many resamples were used (``n_used``) out of ``n_requested``.

A :class:`Metric` pairs the scikit-learn computation on one sample set (``score``, the reference) with
a vectorised one (``batched``) that evaluates B resamples at once from a ``(B, N)`` matrix of draw
counts, so 1000 resamples cost a few matrix products instead of 1000 scikit-learn calls. The tests
check that both agree resample by resample. Any plain ``metric_fn(y_true, probs) -> float`` works as
well, called once per resample (``ValueError`` or ``nan`` from it marks the resample undefined).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from medctl.analysis.metrics import binary_auroc, macro_auroc
from medctl.errors import DataError
from medctl.io import MISSING, format_number

MetricFn = Callable[[np.ndarray, np.ndarray], float]
CHUNK_ELEMENTS = 1_000_000  # resamples are evaluated in blocks of about this many (B x N) cells
TIE_TOLERANCE = 1e-12  # resampled differences closer to zero than this count as zero


# ------------------------------------------------------------------------------------------ results
class Interval(tuple):
    """``(low, high)``, unpacking like a plain pair, that also carries ``n_used`` and ``n_requested``."""

    def __new__(cls, low: float, high: float, n_used: int, n_requested: int) -> Interval:
        interval = super().__new__(cls, (float(low), float(high)))
        interval.n_used = int(n_used)
        interval.n_requested = int(n_requested)
        return interval

    def __getnewargs__(self) -> tuple[float, float, int, int]:  # pickles and copies keep the counts
        return (self[0], self[1], self.n_used, self.n_requested)

    @property
    def low(self) -> float:
        return self[0]

    @property
    def high(self) -> float:
        return self[1]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimate on all samples and its percentile interval over the usable resamples."""

    estimate: float
    low: float
    high: float
    n_used: int
    n_requested: int
    alpha: float

    @property
    def interval(self) -> Interval:
        return Interval(self.low, self.high, self.n_used, self.n_requested)


@dataclass(frozen=True)
class PairedResult:
    """``delta`` = metric(A) - metric(B) on all samples; ``p_value`` two-sided, see :func:`paired_bootstrap`."""

    delta: float
    p_value: float
    n_used: int
    n_requested: int


# ------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class Metric:
    """A metric with a scikit-learn ``score(y, probs)`` and a vectorised ``batched(y, probs, counts)``.

    ``counts`` is ``(B, N)``: how often each sample was drawn in each resample; ``batched`` returns the
    metric of every resample, ``(B,)``, with ``nan`` where it is undefined.
    """

    name: str
    score: Callable[[np.ndarray, np.ndarray], float | None]
    batched: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, y_true: Any, probs: Any) -> float:
        value = self.score(np.asarray(y_true), np.asarray(probs, dtype=np.float64))
        return float("nan") if value is None else float(value)


def headline_metrics(kind: str, threshold: float = 0.5) -> dict[str, Metric]:
    """The four metrics reports put intervals on: accuracy, balanced_accuracy, macro_f1, auroc.

    Binary / multiclass: ``y`` (N,) class indices, ``probs`` (N, K) (binary (N,) is p(class 1)).
    Multilabel: ``y`` (N, L) 0/1, ``probs`` (N, L); accuracy is subset accuracy, balanced accuracy the
    mean per-label balanced accuracy, F1 and AUROC macro over labels; a label is on when
    ``prob >= threshold``. These match :func:`medctl.analysis.metrics.target_metrics`.
    """
    if kind == "multilabel":
        return _multilabel_metrics(threshold)
    if kind == "regression":  # MAE, RMSE, R², Pearson r on (N,) truths and (N, 1) predictions
        from medctl.analysis.regression import REGRESSION_METRICS

        return dict(REGRESSION_METRICS)
    if kind not in ("binary", "multiclass"):
        raise DataError(f"unknown target kind {kind!r}; use binary, multiclass, multilabel or regression")
    return dict(CLASS_METRICS)


def _as_probs(probs: Any) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1 or (probs.ndim == 2 and probs.shape[1] == 1):  # binary p(class 1)
        p1 = probs.reshape(-1)
        probs = np.stack([1.0 - p1, p1], axis=1)  # (N, 2)
    return probs


def _onehot(index: np.ndarray, num_classes: int) -> np.ndarray:
    return (index[:, None] == np.arange(num_classes)[None, :]).astype(np.float64)  # (N, K)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; ``nan`` (no warning) where there are none."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=-1)
    return _ratio(total, finite.sum(axis=-1).astype(np.float64))


def weighted_auroc(positive: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of ``score`` for the 0/1 ``positive`` (N,) under each row of ``counts`` (B, N) -> (B,).

    The Mann-Whitney statistic with ties counted one half (what ``roc_auc_score`` computes), sorted
    once and accumulated with cumulative sums: P(score_pos > score_neg) + 0.5 P(equal).
    """
    positive = np.asarray(positive).astype(bool)
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], positive[order]  # (N,)
    w = counts[:, order]  # (B, N)
    new_group = np.r_[True, s[1:] != s[:-1]]  # (N,) first sample of each run of tied scores
    group = np.cumsum(new_group) - 1  # (N,)
    starts = np.flatnonzero(new_group)  # (G,)
    ends = np.r_[starts[1:], s.size]  # (G,) exclusive
    neg_w = w * ~pos  # (B, N)
    cum_neg = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg_w, axis=1)], axis=1)  # (B, N+1)
    below = cum_neg[:, starts[group[pos]]]  # (B, P) negative weight strictly below each positive
    tied = cum_neg[:, ends[group[pos]]] - below  # (B, P) negative weight tied with it
    pos_w = w[:, pos]  # (B, P)
    num = (pos_w * (below + 0.5 * tied)).sum(axis=1)
    return _ratio(num, pos_w.sum(axis=1) * neg_w.sum(axis=1))


# binary / multiclass: y (N,) int, probs (N, K), counts (B, N)
def _b_accuracy(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    correct = (_as_probs(probs).argmax(axis=1) == y).astype(np.float64)  # (N,)
    return _ratio(counts @ correct, counts.sum(axis=1))


def _b_balanced_accuracy(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    probs = _as_probs(probs)
    truth = _onehot(y, probs.shape[1])  # (N, K)
    hits = truth * (probs.argmax(axis=1) == y)[:, None]  # (N, K)
    return _row_nanmean(_ratio(counts @ hits, counts @ truth))  # recall per class present -> (B,)


def _b_macro_f1(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    probs = _as_probs(probs)
    truth = _onehot(y, probs.shape[1])  # (N, K)
    predicted = _onehot(probs.argmax(axis=1), probs.shape[1])  # (N, K)
    f1 = _ratio(2.0 * (counts @ (truth * predicted)), counts @ truth + counts @ predicted)  # (B, K)
    return _row_nanmean(f1)


def _b_auroc(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    probs = _as_probs(probs)
    if probs.shape[1] == 2:
        return weighted_auroc(y == 1, probs[:, 1], counts)
    per_class = np.stack([weighted_auroc(y == k, probs[:, k], counts) for k in range(probs.shape[1])], 1)
    return _row_nanmean(per_class)  # (B,)


def _quiet_balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # absent classes: sklearn averages over the present ones
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _s_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(accuracy_score(y, _as_probs(probs).argmax(axis=1)))


def _s_balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return _quiet_balanced_accuracy(y, _as_probs(probs).argmax(axis=1))


def _s_macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    probs = _as_probs(probs)
    labels = list(range(probs.shape[1]))
    return float(f1_score(y, probs.argmax(axis=1), labels=labels, average="macro", zero_division=np.nan))


def _s_auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    return macro_auroc(y, _as_probs(probs))


CLASS_METRICS = {
    "accuracy": Metric("accuracy", _s_accuracy, _b_accuracy),
    "balanced_accuracy": Metric("balanced_accuracy", _s_balanced_accuracy, _b_balanced_accuracy),
    "macro_f1": Metric("macro_f1", _s_macro_f1, _b_macro_f1),
    "auroc": Metric("auroc", _s_auroc, _b_auroc),
}


# multilabel: y (N, L) 0/1, probs (N, L), counts (B, N)
def _multilabel_metrics(threshold: float) -> dict[str, Metric]:
    def on(probs: np.ndarray) -> np.ndarray:
        return (np.asarray(probs) >= threshold).astype(np.int64)  # (N, L)

    def b_subset(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        exact = (on(probs) == y).all(axis=1).astype(np.float64)  # (N,)
        return _ratio(counts @ exact, counts.sum(axis=1))

    def b_balanced(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        pred = on(probs)
        tpr = _ratio(counts @ (y * pred), counts @ y)  # (B, L)
        tnr = _ratio(counts @ ((1 - y) * (1 - pred)), counts @ (1 - y))  # (B, L)
        return _row_nanmean(_row_nanmean(np.stack([tpr, tnr], axis=-1)))

    def b_f1(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        pred = on(probs)
        return _row_nanmean(_ratio(2.0 * (counts @ (y * pred)), counts @ y + counts @ pred))

    def b_auroc(y: np.ndarray, probs: np.ndarray, counts: np.ndarray) -> np.ndarray:
        per_label = [weighted_auroc(y[:, j], np.asarray(probs)[:, j], counts) for j in range(y.shape[1])]
        return _row_nanmean(np.stack(per_label, axis=1))

    def s_balanced(y: np.ndarray, probs: np.ndarray) -> float:
        pred = on(probs)
        return float(np.mean([_quiet_balanced_accuracy(y[:, j], pred[:, j]) for j in range(y.shape[1])]))

    def s_auroc(y: np.ndarray, probs: np.ndarray) -> float:
        defined = [
            a for a, _ in (binary_auroc(y[:, j], probs[:, j]) for j in range(y.shape[1])) if a is not None
        ]
        return float(np.mean(defined)) if defined else float("nan")

    return {
        "accuracy": Metric("accuracy", lambda y, p: float(accuracy_score(y, on(p))), b_subset),
        "balanced_accuracy": Metric("balanced_accuracy", s_balanced, b_balanced),
        "macro_f1": Metric(
            "macro_f1", lambda y, p: float(f1_score(y, on(p), average="macro", zero_division=np.nan)), b_f1
        ),
        "auroc": Metric("auroc", s_auroc, b_auroc),
    }


# ---------------------------------------------------------------------------------------- resampling
def resample_indices(n_samples: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of resample indices ``(b, N)``, drawn with replacement; ``n_resamples`` rows in all."""
    rng = np.random.default_rng(seed)
    block = max(1, CHUNK_ELEMENTS // max(n_samples, 1))
    for start in range(0, n_resamples, block):
        yield rng.integers(0, n_samples, size=(min(block, n_resamples - start), n_samples))  # (b, N)


def draw_counts(indices: np.ndarray) -> np.ndarray:
    """``(b, N)`` indices -> ``(b, N)`` float counts of how often each sample was drawn."""
    b, n = indices.shape
    flat = (indices + np.arange(b)[:, None] * n).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _resampled_values(metric_fn: Metric | MetricFn, y: np.ndarray, probs: np.ndarray, indices: np.ndarray):
    if isinstance(metric_fn, Metric):
        return metric_fn.batched(y, probs, draw_counts(indices))  # (b,)
    values = np.empty(indices.shape[0])
    for row, idx in enumerate(indices):
        values[row] = _point(metric_fn, y[idx], probs[idx])
    return values  # (b,)


def _point(metric_fn: Metric | MetricFn, y: np.ndarray, probs: np.ndarray) -> float:
    """The metric on one sample set; ``nan`` where it is undefined."""
    try:
        value = metric_fn(y, probs)
    except ValueError:  # scikit-learn's way of saying "undefined on these samples"
        return float("nan")
    return float("nan") if value is None else float(value)


def _checked(y_true: Any, *probs: Any) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    arrays = [np.asarray(p, dtype=np.float64) for p in probs]
    if y.shape[0] == 0:
        raise DataError("no samples to bootstrap; the split is empty")
    for p in arrays:
        if p.shape[0] != y.shape[0]:
            raise DataError(f"{p.shape[0]} predictions for {y.shape[0]} labels; pass one row per sample")
    return (y, *arrays)


def _check_settings(n: int, alpha: float | None = None) -> None:
    if n < 0:
        raise DataError(f"bootstrap n={n}: use 0 (no resampling) or a positive number such as 1000")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise DataError(f"alpha={alpha} must lie strictly between 0 and 1 (0.05 gives a 95% interval)")


# ---------------------------------------------------------------------------------------- intervals
def bootstrap_many(
    metrics: Mapping[str, Metric | MetricFn],
    y_true: Any,
    probs: Any,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, BootstrapResult]:
    """Percentile intervals for several metrics over the same resamples (one draw for all)."""
    _check_settings(n, alpha)
    y, p = _checked(y_true, probs)
    values: dict[str, list[np.ndarray]] = {name: [] for name in metrics}
    for indices in resample_indices(y.shape[0], n, seed):
        for name, fn in metrics.items():
            values[name].append(_resampled_values(fn, y, p, indices))
    results = {}
    for name, fn in metrics.items():
        estimate = _point(fn, y, p)
        drawn = np.concatenate(values[name]) if values[name] else np.empty(0)
        usable = drawn[np.isfinite(drawn)]
        low, high = np.quantile(usable, [alpha / 2, 1 - alpha / 2]) if usable.size else (np.nan, np.nan)
        results[name] = BootstrapResult(
            estimate=estimate,
            low=float(low),
            high=float(high),
            n_used=int(usable.size),
            n_requested=n,
            alpha=alpha,
        )
    return results


def bootstrap_ci(
    metric_fn: Metric | MetricFn, y_true: Any, probs: Any, n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> Interval:
    """Percentile bootstrap ``(low, high)`` at level ``1 - alpha``; ``.n_used`` resamples were usable.

    ``(nan, nan)`` when no resample is usable (or ``n == 0``).
    """
    return bootstrap_many({"metric": metric_fn}, y_true, probs, n, alpha, seed)["metric"].interval


def paired_bootstrap(
    metric_fn: Metric | MetricFn, y_true: Any, probs_a: Any, probs_b: Any, n: int = 1000, seed: int = 0
) -> PairedResult:
    """Two-sided paired bootstrap test that A and B score differently on the same samples.

    Each resample draws the same indices for A and B and records ``d = metric(A) - metric(B)``
    (resamples where either is undefined are skipped). With ``delta`` the difference on all samples:
    if ``delta > 0``, ``p = 2 * share(d <= 0)``; if ``delta < 0``, ``p = 2 * share(d >= 0)``; both
    clipped to 1; ``p = 1`` when ``delta == 0`` (identical predictions). Differences within
    ``TIE_TOLERANCE`` of zero count as zero, and zero counts as the other side (conservative). The
    smallest non-zero p is ``2 / n_used``; ``p = 0`` means no resample crossed zero. ``nan`` when the
    metric is undefined on all samples or on every resample.
    """
    _check_settings(n)
    y, a, b = _checked(y_true, probs_a, probs_b)
    deltas = []
    for indices in resample_indices(y.shape[0], n, seed):
        deltas.append(
            _resampled_values(metric_fn, y, a, indices) - _resampled_values(metric_fn, y, b, indices)
        )
    drawn = np.concatenate(deltas) if deltas else np.empty(0)
    usable = drawn[np.isfinite(drawn)]
    delta = _point(metric_fn, y, a) - _point(metric_fn, y, b)
    if not np.isfinite(delta) or usable.size == 0:
        p_value = float("nan")
    elif abs(delta) <= TIE_TOLERANCE:
        p_value = 1.0
    elif delta > 0:
        p_value = min(1.0, 2.0 * float(np.mean(usable <= TIE_TOLERANCE)))
    else:
        p_value = min(1.0, 2.0 * float(np.mean(usable >= -TIE_TOLERANCE)))
    return PairedResult(delta=delta, p_value=p_value, n_used=int(usable.size), n_requested=n)


def paired_bootstrap_pvalue(
    metric_fn: Metric | MetricFn, y_true: Any, probs_a: Any, probs_b: Any, n: int = 1000, seed: int = 0
) -> float:
    """The p-value of :func:`paired_bootstrap` (see there for exactly how it is computed)."""
    return paired_bootstrap(metric_fn, y_true, probs_a, probs_b, n, seed).p_value


def interval_cells(ci: Mapping[str, Any]) -> list[str]:
    """A bootstrap interval's two report cells: ``[low, high]`` (or :data:`MISSING`) and ``used / requested``."""
    interval = MISSING if ci["low"] is None else f"[{format_number(ci['low'])}, {format_number(ci['high'])}]"
    return [interval, f"{ci['n_used']} / {ci['n_requested']}"]
