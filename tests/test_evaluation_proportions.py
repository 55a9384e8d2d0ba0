"""Hit-rate intervals and the exact paired tests, against formulas written out here independently."""

from __future__ import annotations

import math

import pytest

from medctl.analysis.proportions import (
    above_chance,
    comparison_words,
    fewest_pairs_to_decide,
    paired_hits_test,
    rate_interval,
    sign_test,
)

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927) score interval, from its closed form."""
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    return centre - half, centre + half


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p: twice the smaller binomial tail of the discordant pairs, at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(("k", "n"), [(0, 20), (3, 20), (9, 12), (19, 20), (5, 5)])
def test_the_interval_is_wilsons(k, n):
    rate = rate_interval(k, n)
    low, high = wilson(k, n)
    assert rate.rate == pytest.approx(k / n)
    assert (rate.low, rate.high) == (
        pytest.approx(max(low, 0.0), abs=1e-12),
        pytest.approx(min(high, 1.0), abs=1e-12),
    )
    assert rate.low <= rate.rate <= rate.high
    assert math.isnan(rate_interval(0, 0).rate)


def test_three_of_twenty_against_two_is_not_distinguishable():
    method = [True] * 3 + [False] * 17
    other = [True] * 2 + [False] * 18  # one discordant pair
    test = paired_hits_test(method, other)
    assert (test.hits, test.other_hits, test.only_method, test.only_other) == (3, 2, 1, 0)
    assert test.p == pytest.approx(exact_mcnemar(1, 0)) == 1.0
    outcome, phrase = comparison_words(test, "the input baseline", 0.05)
    assert outcome == "not distinguishable"
    assert phrase == "not distinguishable from the input baseline (3/20 vs 2/20, p = 1.000)"
    # disjoint hits: 3 against 2 discordant the other way round
    disjoint = paired_hits_test(method, [False] * 3 + [True] * 2 + [False] * 15)
    assert disjoint.p == pytest.approx(exact_mcnemar(3, 2))


@pytest.mark.parametrize(("b", "c"), [(9, 0), (12, 2), (5, 5), (0, 7), (1, 0)])
def test_the_paired_test_is_exact_mcnemar(b, c):
    method = [True] * b + [False] * c + [True] * 4 + [False] * 3  # 4 both hit, 3 both miss
    other = [False] * b + [True] * c + [True] * 4 + [False] * 3
    test = paired_hits_test(method, other)
    assert test.p == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
    outcome, _ = comparison_words(test, "x", 0.05)
    assert outcome == (
        "beats" if test.p < 0.05 and b > c else "below" if test.p < 0.05 else "not distinguishable"
    )


def test_nineteen_of_twenty_beats_three_of_twenty():
    method = [True] * 19 + [False]
    other = [True] * 3 + [False] * 17
    outcome, phrase = comparison_words(paired_hits_test(method, other), "random weights", 0.05)
    assert outcome == "beats" and phrase == "beats random weights (19/20 vs 3/20, p < 0.001)"


def test_above_chance_is_the_upper_binomial_tail():
    def tail(k, n, p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    assert above_chance(1, 20, 0.007) == pytest.approx(tail(1, 20, 0.007))
    assert above_chance(3, 20, 0.007) == pytest.approx(tail(3, 20, 0.007))
    assert above_chance(0, 20, 0.007) == pytest.approx(1.0)
    assert above_chance(0, 0, 0.1) == 1.0


def test_sign_test_drops_ties_and_counts_directions():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    y = [0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.2]  # lower 5 times, one tie, higher once
    test = sign_test(x, y)
    assert (test.n, test.lower, test.higher) == (6, 5, 1)
    assert test.p == pytest.approx(exact_mcnemar(5, 1))


def test_fewest_pairs_an_exact_paired_test_needs_to_decide():
    """Every discordant pair won by one side: two-sided p = 2 * 0.5**k, written out here."""
    for alpha in (0.1, 0.05, 0.01):
        k = fewest_pairs_to_decide(alpha)
        assert 2 * 0.5**k < alpha <= 2 * 0.5 ** (k - 1)
        assert paired_hits_test([True] * k, [False] * k).p < alpha
        assert paired_hits_test([True] * (k - 1), [False] * (k - 1)).p >= alpha
    assert fewest_pairs_to_decide(0.05) == 6
