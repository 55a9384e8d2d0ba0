"""Every metric against scikit-learn computed independently here, absent classes included."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medctl.analysis.metrics import classification_metrics, multilabel_metrics
from medctl.errors import DataError


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 120)  # (N,)
    logits = rng.normal(size=(120, 4))
    logits[np.arange(120), y] += 1.2
    probs = np.round(softmax(logits), 1)  # coarse values tie often; AUROC must count a tie as 1/2
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_multiclass_matches_sklearn(multiclass):
    y, probs = multiclass
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred)
    for k, name in enumerate("abcd"):
        entry = m["per_class"][name]
        assert entry["precision"] == pytest.approx(precision[k])
        assert entry["recall"] == pytest.approx(recall[k])
        assert entry["f1"] == pytest.approx(f1[k])
        assert entry["support"] == support[k]
        assert entry["auroc"] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["n"] == 120 and m["notes"] == []


def test_binary_accepts_two_columns_or_p1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.35 * y + 0.65 * rng.random(80), 0, 1)
    two = classification_metrics(y, np.stack([1 - p1, p1], 1), ["neg", "pos"], kind="binary")
    one = classification_metrics(y, p1, ["neg", "pos"], kind="binary")
    assert two == one
    pred = (p1 > 0.5).astype(int)
    assert two["auroc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert two["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert two["per_class"]["pos"]["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert two["per_class"]["neg"]["recall"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_reported_not_a_crash(multiclass):
    y, probs = multiclass
    y = np.where(y == 3, 0, y)  # class "d" never occurs in y_true
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    pred = probs.argmax(axis=1)

    d = m["per_class"]["d"]
    assert d["auroc"] is None and "absent" in d["auroc_note"] and d["support"] == 0
    assert any("'d'" in note for note in m["notes"])
    assert len(m["confusion_matrix"]) == 4 and sum(m["confusion_matrix"][3]) == 0
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()
    expected_auroc = np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in range(3)])
    assert m["auroc"] == pytest.approx(expected_auroc)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    # macro F1 over the classes where it is defined, as sklearn's default label set gives
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_single_class_split_has_no_auroc():
    y = np.zeros(10, dtype=int)
    p1 = np.linspace(0, 1, 10)
    m = classification_metrics(y, p1, ["no", "yes"], kind="binary")
    assert m["auroc"] is None
    assert all(entry["auroc"] is None for entry in m["per_class"].values())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, (p1 > 0.5).astype(int)))


def test_multilabel_matches_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (100, 5))  # (N, L)
    probs = np.round(np.clip(0.3 * y + 0.7 * rng.random((100, 5)), 0, 1), 2)
    labels = ["l0", "l1", "l2", "l3", "l4"]
    m = multilabel_metrics(y, probs, labels, threshold=0.5)
    pred = (probs >= 0.5).astype(int)

    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    for avg in ("micro", "macro"):
        assert m[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg))
        assert m[f"{avg}_precision"] == pytest.approx(skm.precision_score(y, pred, average=avg))
        assert m[f"{avg}_recall"] == pytest.approx(skm.recall_score(y, pred, average=avg))
        assert m[f"{avg}_auroc"] == pytest.approx(skm.roc_auc_score(y, probs, average=avg))
    assert m["auroc"] == m["macro_auroc"]
    assert m["balanced_accuracy"] == pytest.approx(
        np.mean([skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(5)])
    )
    for j, name in enumerate(labels):
        entry = m["per_class"][name]
        assert entry["auroc"] == pytest.approx(skm.roc_auc_score(y[:, j], probs[:, j]))
        assert entry["f1"] == pytest.approx(skm.f1_score(y[:, j], pred[:, j]))
        assert entry["precision"] == pytest.approx(skm.precision_score(y[:, j], pred[:, j]))
        assert entry["recall"] == pytest.approx(skm.recall_score(y[:, j], pred[:, j]))
        assert entry["support"] == int(y[:, j].sum())
    assert m["confusion_matrix"] == skm.multilabel_confusion_matrix(y, pred).tolist()


def test_multilabel_label_without_positives():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (40, 3))
    y[:, 2] = 0
    probs = rng.random((40, 3))
    m = multilabel_metrics(y, probs, ["a", "b", "c"], threshold=0.3)
    assert m["per_class"]["c"]["auroc"] is None
    assert m["auroc"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, j], probs[:, j]) for j in range(2)]))
    pred = (probs >= 0.3).astype(int)
    assert m["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    subset = multilabel_metrics(y, probs, ["a", "b", "c"])["accuracy"]  # the default threshold, 0.5
    assert subset == pytest.approx(skm.accuracy_score(y, (probs >= 0.5).astype(int)))


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (np.array([0, 1, 3]), np.full((3, 3), 1 / 3), "outside 0..2"),
        (np.array([0, 1, 2]), np.full((3, 4), 0.25), "3 classes"),
        (np.array([0, 1]), np.full((3, 3), 1 / 3), "one class index per sample"),
        (np.array([0, 1, 2]), np.array([[np.nan, 0.5, 0.5]] * 3), "NaN"),
    ],
)
def test_bad_inputs_raise_one_clear_error(y, probs, message):
    with pytest.raises(DataError, match=message):
        classification_metrics(y, probs, ["a", "b", "c"])


def test_multilabel_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match=r"\(N, 3\)"):
        multilabel_metrics(np.zeros((4, 2), dtype=int), np.zeros((4, 2)), ["a", "b", "c"])
