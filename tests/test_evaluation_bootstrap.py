"""Bootstrap CIs and the paired test: vectorised resamples equal scikit-learn on the same indices."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from medctl.analysis.bootstrap import (
    bootstrap_ci,
    bootstrap_many,
    draw_counts,
    headline_metrics,
    paired_bootstrap,
    paired_bootstrap_pvalue,
    resample_indices,
)
from medctl.errors import DataError


def make_predictions(n: int, k: int = 3, signal: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)  # (N,)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, np.round(probs, 1)  # coarse: ties in the scores


def sk_balanced_accuracy(y, probs):
    return skm.balanced_accuracy_score(y, probs.argmax(axis=1))


def sk_auroc_binary(y, probs):
    return skm.roc_auc_score(y, probs[:, 1])  # raises ValueError on a single-class resample


# what each headline metric is in plain scikit-learn, written independently of medctl
REFERENCE = {
    "accuracy": lambda y, p: skm.accuracy_score(y, p.argmax(1)),
    "balanced_accuracy": sk_balanced_accuracy,
    "macro_f1": lambda y, p: skm.f1_score(y, p.argmax(1), average="macro"),
    "auroc": lambda y, p: np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in np.unique(y)]),
}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("name", list(REFERENCE))
def test_vectorised_resamples_equal_sklearn(name):
    y, probs = make_predictions(60, k=4, signal=1.0)
    metric = headline_metrics("multiclass")[name]
    indices = next(resample_indices(60, 25, seed=3))  # (25, 60)
    batched = metric.batched(y, probs, draw_counts(indices))
    for value, idx in zip(batched, indices, strict=True):
        if name == "auroc" and len(np.unique(y[idx])) < 2:
            assert math.isnan(value)
            continue
        assert value == pytest.approx(REFERENCE[name](y[idx], probs[idx]), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multilabel_vectorised_resamples_equal_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (50, 3))
    probs = np.round(np.clip(0.3 * y + 0.7 * rng.random((50, 3)), 0, 1), 1)
    indices = next(resample_indices(50, 20, seed=5))
    counts = draw_counts(indices)
    metrics = headline_metrics("multilabel")
    for idx, row in zip(indices, range(20), strict=True):
        yy, pp = y[idx], probs[idx]
        pred = (pp >= 0.5).astype(int)
        expected = {
            "accuracy": skm.accuracy_score(yy, pred),
            "balanced_accuracy": np.mean(
                [skm.balanced_accuracy_score(yy[:, j], pred[:, j]) for j in range(3)]
            ),
            "macro_f1": skm.f1_score(yy, pred, average="macro"),
            "auroc": skm.roc_auc_score(yy, pp, average="macro"),
        }
        for name, value in expected.items():
            assert metrics[name].batched(y, probs, counts)[row] == pytest.approx(value, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 30),
    k=st.integers(2, 4),
    seed=st.integers(0, 10_000),
)
def test_vectorised_auroc_and_f1_hold_for_any_draw(n, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    probs = rng.integers(0, 4, (n, k)).astype(float)  # many ties, classes may be absent
    indices = rng.integers(0, n, (3, n))
    counts = draw_counts(indices)
    metrics = headline_metrics("multiclass")
    for name in ("auroc", "macro_f1", "balanced_accuracy", "accuracy"):
        batched = metrics[name].batched(y, probs, counts)
        for value, idx in zip(batched, indices, strict=True):
            expected = metrics[name](y[idx], probs[idx])  # the scikit-learn path
            assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected, abs=1e-12)


def test_ci_contains_estimate_and_shrinks_with_n():
    metric = headline_metrics("multiclass")["balanced_accuracy"]
    widths = []
    for n in (60, 2000):
        y, probs = make_predictions(n, seed=1)
        low, high = bootstrap_ci(metric, y, probs, n=500, seed=0)
        estimate = metric(y, probs)
        assert low <= estimate <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~ 1 / sqrt(N): 60 -> 2000 is a factor of ~5.8


def test_ci_is_deterministic_with_a_seed_and_counts_resamples():
    y, probs = make_predictions(100)
    metric = headline_metrics("multiclass")["macro_f1"]
    first = bootstrap_ci(metric, y, probs, n=300, seed=7)
    assert first == bootstrap_ci(metric, y, probs, n=300, seed=7)
    assert first != bootstrap_ci(metric, y, probs, n=300, seed=8)
    assert (first.n_used, first.n_requested) == (300, 300)
    assert first.low == first[0] and first.high == first[1]


@pytest.mark.filterwarnings("ignore:Only one class is present")
def test_undefined_resamples_are_skipped_and_counted_same_as_plain_callable():
    y = np.array([0] * 9 + [1])  # most resamples miss the single positive: AUROC undefined there
    p1 = np.linspace(0.1, 0.9, 10)
    probs = np.stack([1 - p1, p1], axis=1)
    vectorised = bootstrap_ci(headline_metrics("binary")["auroc"], y, probs, n=400, seed=2)
    plain = bootstrap_ci(sk_auroc_binary, y, probs, n=400, seed=2)
    assert 0 < vectorised.n_used < 400
    assert vectorised.n_used == plain.n_used
    assert tuple(vectorised) == pytest.approx(tuple(plain))


def test_plain_callable_gives_same_interval_as_vectorised():
    y, probs = make_predictions(80)
    a = bootstrap_ci(sk_balanced_accuracy, y, probs, n=200, seed=4)
    b = bootstrap_ci(headline_metrics("multiclass")["balanced_accuracy"], y, probs, n=200, seed=4)
    assert tuple(a) == pytest.approx(tuple(b))


def test_thousand_resamples_of_200_well_under_a_second():
    y, probs = make_predictions(200)
    metric = headline_metrics("multiclass")["balanced_accuracy"]
    start = time.perf_counter()
    interval = bootstrap_ci(metric, y, probs, n=1000, seed=0)
    assert time.perf_counter() - start < 0.5
    assert interval.n_used == 1000


def test_bootstrap_many_shares_resamples():
    y, probs = make_predictions(90)
    metrics = headline_metrics("multiclass")
    many = bootstrap_many(metrics, y, probs, n=200, seed=3)
    for name, metric in metrics.items():
        assert many[name].interval == bootstrap_ci(metric, y, probs, n=200, seed=3)
        assert many[name].estimate == pytest.approx(metric(y, probs))


def test_paired_pvalue_identical_is_one_and_different_is_small():
    y, good = make_predictions(200, signal=3.0, seed=5)
    rng = np.random.default_rng(6)
    random = rng.dirichlet(np.ones(3), size=200)
    metric = headline_metrics("multiclass")["balanced_accuracy"]
    assert paired_bootstrap_pvalue(metric, y, good, good.copy(), n=500, seed=0) == 1.0
    result = paired_bootstrap(metric, y, good, random, n=500, seed=0)
    assert result.delta > 0.3 and result.p_value < 0.01 and result.n_used == 500
    # same seed, same resamples: swapping A and B negates every difference, the p-value is unchanged
    assert paired_bootstrap_pvalue(metric, y, random, good, n=500, seed=0) == result.p_value
    assert paired_bootstrap_pvalue(metric, y, good, random, n=500, seed=0) == result.p_value


def test_paired_pvalue_for_close_models_is_large_and_in_range():
    y, a = make_predictions(150, signal=1.0, seed=7)
    b = a.copy()
    b[:5] = b[:5, ::-1]  # change a handful of predictions
    metric = headline_metrics("multiclass")["accuracy"]
    p = paired_bootstrap_pvalue(metric, y, a, b, n=400, seed=1)
    assert 0.05 < p <= 1.0
    assert p == paired_bootstrap_pvalue(sk_accuracy, y, a, b, n=400, seed=1)


def sk_accuracy(y, probs):
    return skm.accuracy_score(y, probs.argmax(axis=1))


def test_settings_are_checked():
    y, probs = make_predictions(20)
    metric = headline_metrics("multiclass")["accuracy"]
    empty = bootstrap_ci(metric, y, probs, n=0)
    assert math.isnan(empty.low) and empty.n_used == 0
    with pytest.raises(DataError, match="alpha"):
        bootstrap_ci(metric, y, probs, alpha=1.5)
    with pytest.raises(DataError, match="one row per sample"):
        bootstrap_ci(metric, y, probs[:10])
    with pytest.raises(DataError, match="kind"):
        headline_metrics("ordinal")
