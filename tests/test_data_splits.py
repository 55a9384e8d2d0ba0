"""Generated splits: property tests (hypothesis) and a reference check of the stratification."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medctl.data.splits import make_inner_split, make_splits, normalize_split

RATIOS = st.sampled_from([(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.8, 0.2, 0.0), (0.5, 0.25, 0.25)])


@st.composite
def grouped_table(draw):
    n_groups = draw(st.integers(10, 60))
    sizes = draw(st.lists(st.integers(1, 3), min_size=n_groups, max_size=n_groups))
    n_labels = draw(st.integers(1, 4))
    multilabel = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    groups = [f"g{g}" for g, size in enumerate(sizes) for _ in range(size)]
    if multilabel:
        labels = (rng.random((len(groups), n_labels)) < 0.4).astype(int)
    else:
        labels = np.eye(n_labels, dtype=int)[rng.integers(0, n_labels, len(groups))]
    return groups, labels


@settings(max_examples=60, deadline=None)
@given(table=grouped_table(), ratios=RATIOS, seed=st.integers(0, 1000))
def test_groups_never_span_splits(table, ratios, seed):
    groups, labels = table
    splits = make_splits(groups, labels, ratios, seed)
    seen: dict[str, str] = {}
    for group, split in zip(groups, splits, strict=True):
        assert seen.setdefault(group, split) == split


@settings(max_examples=60, deadline=None)
@given(table=grouped_table(), ratios=RATIOS, seed=st.integers(0, 1000))
def test_ratios_are_approximately_kept(table, ratios, seed):
    groups, labels = table
    splits = make_splits(groups, labels, ratios, seed)
    n = len(groups)
    for name, ratio in zip(("train", "val", "test"), ratios, strict=True):
        share = float(np.mean(splits == name))
        if ratio == 0:
            assert share == 0  # a zero ratio never receives a sample
        else:
            assert abs(share - ratio) <= 0.1 + 3 / n  # groups of up to 3 rows: granularity 3/n


@settings(max_examples=30, deadline=None)
@given(table=grouped_table(), ratios=RATIOS, seed=st.integers(0, 1000))
def test_deterministic_for_a_seed_and_independent_of_row_order(table, ratios, seed):
    groups, labels = table
    first = make_splits(groups, labels, ratios, seed)
    assert (make_splits(groups, labels, ratios, seed) == first).all()
    order = np.random.default_rng(seed).permutation(len(groups))
    shuffled = make_splits([groups[i] for i in order], labels[order], ratios, seed)
    assert (shuffled == first[order]).all()


def test_stratification_keeps_class_shares_per_split():
    rng = np.random.default_rng(0)
    classes = rng.choice(3, size=300, p=[0.6, 0.3, 0.1])
    splits = make_splits([str(i) for i in range(300)], np.eye(3)[classes], (0.6, 0.2, 0.2), seed=0)
    for split in ("train", "val", "test"):
        share = np.bincount(classes[splits == split], minlength=3) / np.sum(splits == split)
        np.testing.assert_allclose(share, np.bincount(classes, minlength=3) / 300, atol=0.03)


def test_multilabel_rare_labels_reach_every_split():
    # a rare label on 6 of 200 rows: iterative stratification spreads it 4/1/1 over 0.6/0.2/0.2
    labels = np.zeros((200, 2), dtype=int)
    labels[:120, 0] = 1
    labels[[3, 50, 90, 130, 170, 199], 1] = 1
    splits = make_splits([str(i) for i in range(200)], labels, (0.6, 0.2, 0.2), seed=3)
    rare = splits[labels[:, 1] == 1]
    assert {s: int((rare == s).sum()) for s in ("train", "val", "test")} == {"train": 4, "val": 1, "test": 1}


def test_split_aliases():
    assert [normalize_split(v) for v in ("Train", "validation", "VALID", "dev", "testing", "holdout")] == [
        "train", "val", "val", "val", "test", None,
    ]  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=6, max_size=30),
    share=st.floats(0.15, 0.5),
    seed=st.integers(0, 1000),
)
def test_inner_split_keeps_subjects_whole_and_is_seeded(sizes, share, seed):
    groups = [f"s{g}" for g, n in enumerate(sizes) for _ in range(n)]
    labels = np.eye(2)[[g % 2 for g, n in enumerate(sizes) for _ in range(n)]]  # (N, 2) one-hot
    parts = make_inner_split(groups, labels, share, seed)
    assert set(parts) <= {"inner_train", "inner_val"} and "inner_train" in set(parts)
    for group in set(groups):  # one subject never on both sides
        assert len({p for p, g in zip(parts, groups, strict=True) if g == group}) == 1
    order = np.random.default_rng(seed).permutation(len(groups))  # row order does not matter
    shuffled = make_inner_split([groups[i] for i in order], labels[order], share, seed)
    assert list(shuffled) == [parts[i] for i in order]
    assert (parts == "inner_val").sum() <= share * len(groups) + max(sizes)
