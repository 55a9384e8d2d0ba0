"""evaluate_predictions artifacts, figures, markdown -> HTML, and the leaderboard."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from medctl.analysis.bootstrap import headline_metrics
from medctl.analysis.leaderboard import (
    format_ci,
    leaderboard,
    leaderboard_markdown,
    leaderboard_row,
    p_values_vs_leader,
    write_leaderboard,
)
from medctl.analysis.markdown import markdown_to_html
from medctl.analysis.plots import plot_confusion_matrix, plot_training_curves
from medctl.analysis.reports import evaluate_predictions
from medctl.errors import DataError

CLASSES = ["healthy", "pre_diabetes", "oral_med", "insulin"]


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    n = 48
    y = rng.integers(0, 4, n)  # (N,)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # (N, K)
    return [f"sub-{i:03d}" for i in range(n)], y, probs


def image_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_evaluate_predictions_writes_every_artifact(tmp_path, predictions):
    ids, y, probs = predictions
    target = {"name": "study_group", "kind": "multiclass", "classes": CLASSES}
    result = evaluate_predictions(ids, y, probs, [target], tmp_path, split="test", n_bootstrap=200, seed=1)
    pred = probs.argmax(axis=1)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    t = metrics["targets"]["study_group"]
    assert t["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert t["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert t["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert t["auroc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        ci = t["ci"][key]
        assert ci["low"] <= t[key] <= ci["high"] and ci["n_used"] == 200 and ci["level"] == 0.95
        assert metrics["summary"][f"{key}_ci"] == [ci["low"], ci["high"]]
    assert metrics["n_samples"] == 48 and metrics["n_bootstrap"] == 200

    preds = pd.read_parquet(tmp_path / "test_preds.parquet")
    assert list(preds["id"]) == ids
    assert (preds["y_true"].to_numpy() == y).all() and (preds["y_pred"].to_numpy() == pred).all()
    assert list(preds["true_label"][:3]) == [CLASSES[k] for k in y[:3]]
    np.testing.assert_allclose(preds[[f"prob_{c}" for c in CLASSES]].to_numpy(), probs, rtol=1e-6)

    cm = pd.read_csv(tmp_path / "test_confusion_study_group.csv", index_col=0)
    assert cm.to_numpy().tolist() == skm.confusion_matrix(y, pred).tolist()
    assert list(cm.columns) == CLASSES

    report = (tmp_path / "report.md").read_text()
    links = image_links(report)
    assert "figures/test_confusion_study_group.png" in links and "figures/test_roc_study_group.png" in links
    for link in links:
        assert Image.open(tmp_path / link).size[0] > 100
    assert f"| balanced accuracy | {t['balanced_accuracy']:.3f} |" in report

    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(links)
    assert "<table>" in page and "<td>insulin</td>" in page
    assert "figures/test_confusion" not in page  # embedded, no file references left


def test_evaluate_several_targets_prefixes_columns(tmp_path):
    rng = np.random.default_rng(1)
    n = 30
    y_bin = rng.integers(0, 2, n)
    p1 = np.clip(0.4 * y_bin + 0.6 * rng.random(n), 0, 1)  # (N,) p(class 1), a sigmoid head's output
    y_ml = rng.integers(0, 2, (n, 3))
    y_ml[:, 2] = 0  # a label with no positives: its AUROC is undefined, nothing crashes
    p_ml = rng.random((n, 3))
    targets = [
        {"name": "edema", "kind": "binary", "classes": ["absent", "present"]},
        {"name": "findings", "kind": "multilabel", "classes": ["crack", "stain", "dent"]},
    ]
    result = evaluate_predictions(
        range(n),
        {"edema": y_bin, "findings": y_ml},
        {"edema": p1, "findings": p_ml},
        targets,
        tmp_path,
        split="val",
        n_bootstrap=50,
    )
    preds = pd.read_parquet(tmp_path / "val_preds.parquet")
    assert {"id", "edema_true", "edema_prob_present", "findings_pred", "findings_prob_dent"} <= set(preds)
    assert preds["findings_true"].iloc[0].tolist() == y_ml[0].tolist()
    assert result["summary"]["auroc"] == pytest.approx(skm.roc_auc_score(y_bin, p1))
    findings = result["targets"]["findings"]
    pred_ml = (p_ml >= 0.5).astype(int)
    assert findings["hamming_loss"] == pytest.approx(skm.hamming_loss(y_ml, pred_ml))
    assert findings["per_class"]["dent"]["auroc"] is None
    assert findings["auroc"] == pytest.approx(
        np.mean([skm.roc_auc_score(y_ml[:, j], p_ml[:, j]) for j in range(2)])
    )
    table = pd.read_csv(tmp_path / "val_confusion_findings.csv")
    assert table[["tn", "fp", "fn", "tp"]].to_numpy().tolist() == [
        m.ravel().tolist() for m in skm.multilabel_confusion_matrix(y_ml, pred_ml)
    ]
    for link in image_links((tmp_path / "report.md").read_text()):
        assert (tmp_path / link).is_file()


def test_evaluate_rejects_mismatched_inputs(tmp_path, predictions):
    ids, y, probs = predictions
    target = {"name": "g", "kind": "multiclass", "classes": CLASSES}
    with pytest.raises(DataError, match="47 labels"):
        evaluate_predictions(ids, y[:-1], probs, [target], tmp_path, n_bootstrap=0)
    with pytest.raises(DataError, match="keyed by target name"):
        evaluate_predictions(ids, y, probs, [target, {**target, "name": "h"}], tmp_path, n_bootstrap=0)
    with pytest.raises(DataError, match="needs a name"):
        evaluate_predictions(ids, y, probs, [{"name": "g", "kind": "ordinal", "classes": CLASSES}], tmp_path)


def test_plots_write_real_images(tmp_path):
    cm = np.array([[5, 1], [2, 7]])
    path = plot_confusion_matrix(cm, ["no", "yes"], tmp_path / "cm.png", normalize=True)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 10  # something is drawn
    history = [
        {
            "epoch": e,
            "train_loss": 1.0 / (e + 1),
            "val_loss": 1.2 / (e + 1),
            "val_balanced_accuracy": 0.5 + 0.1 * e,
        }
        for e in range(4)
    ]
    curves = plot_training_curves(
        history, tmp_path / "curves" / "training.png", ["loss", "balanced_accuracy"]
    )
    assert curves.is_file() and Image.open(curves).size[0] > Image.open(curves).size[1]
    jsonl_rows = [  # metrics.jsonl: one row per phase and epoch, per-step rows left out
        {"phase": "train", "epoch": 0, "step": 4, "loss": 1.0},
        {"phase": "train_step", "epoch": 0, "step": 1, "loss": 9.0},
        {"phase": "val", "epoch": 0, "step": 4, "loss": 1.1, "balanced_accuracy": 0.5},
        {"phase": "train", "epoch": 1, "step": 8, "loss": 0.7},
        {"phase": "val", "epoch": 1, "step": 8, "loss": 0.9, "balanced_accuracy": 0.6},
    ]
    from_jsonl = plot_training_curves(jsonl_rows, tmp_path / "jsonl.png", ["loss", "balanced_accuracy"])
    assert np.asarray(Image.open(from_jsonl).convert("L"), dtype=float).std() > 10
    with pytest.raises(DataError, match="does not match"):
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "bad.png")


def test_markdown_to_html_subset(tmp_path):
    (tmp_path / "figs").mkdir()
    Image.new("RGB", (4, 3), "red").save(tmp_path / "figs" / "a.png")
    md = "\n".join(
        [
            "# Title with `code`",
            "",
            "Some **bold** and *italic* text, a [link](https://example.org) & <tag>.",
            "continued line, snake_case_name stays.",
            "",
            "| name | value |",
            "| --- | ---: |",
            "| a\\|b | 0.5 |",
            "| c | 1 |",
            "",
            "![a figure](figs/a.png)",
            "",
            "- first",
            "- second with `x < y`",
            "",
            "1. one",
            "2. two",
            "",
            "```python",
            "if a < b:",
            "    print('<hi>')",
            "```",
            "",
            "![gone](figs/missing.png)",
            "",
            "<script>alert(1)</script> in a class name",
        ]
    )
    page = re.sub(r">\s+<", "><", markdown_to_html(md, tmp_path))
    assert "<h1>Title with <code>code</code></h1>" in page
    assert "<strong>bold</strong>" in page and "<em>italic</em>" in page
    assert '<a href="https://example.org">link</a>' in page and "&amp; &lt;tag&gt;" in page
    assert "snake_case_name" in page
    assert (
        "<th>name</th>" in page and '<td style="text-align:right">0.5</td>' in page and "<td>a|b</td>" in page
    )
    assert "<ul><li>first</li><li>second with <code>x &lt; y</code></li></ul>" in page
    assert "<ol><li>one</li><li>two</li></ol>" in page
    assert "print('&lt;hi&gt;')" in page and '<code class="language-python">' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; in a class name" in page and "<script>" not in page
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(encoded) == (tmp_path / "figs" / "a.png").read_bytes()
    assert "missing image: figs/missing.png" in page
    assert (
        page.startswith("<!DOCTYPE html>") and "<style>" in page and "<title>Title with code</title>" in page
    )


def test_leaderboard_sorted_failed_last_and_formatted():
    rows = [
        {
            "entry": "random",
            "checkpoint": "",
            "val_balanced_accuracy": 0.41,
            "val_balanced_accuracy_ci": [0.3, 0.5],
            "test_balanced_accuracy": 0.40,
            "epochs": 10,
            "wall_time_s": 12.34,
        },
        {
            "entry": "broken",
            "checkpoint": "ckpts/b.pt",
            "status": "failed",
            "reason": "checkpoint keys do not match",
        },
        {
            "entry": "multi_domain",
            "checkpoint": "ckpts/md.pt",
            "val_balanced_accuracy": 0.8123,
            "val_balanced_accuracy_ci": [0.7512, 0.8734],
            "test_balanced_accuracy": 0.79,
            "test_balanced_accuracy_ci": [0.7, 0.86],
            "test_auroc": 0.9,
            "epochs": 50,
            "wall_time_s": 3725,
        },
        {
            "entry": "single_domain",
            "checkpoint": "ckpts/sd.pt",
            "val_balanced_accuracy": 0.66,
            "test_balanced_accuracy": 0.61,
            "epochs": 50,
            "wall_time_s": 125,
            "p_vs_leader": 0.0004,
        },
        {"entry": "no_val", "checkpoint": "ckpts/n.pt"},
    ]
    df = leaderboard(rows)
    assert list(df["entry"]) == ["multi_domain", "single_domain", "random", "no_val", "broken"]
    assert df["rank"].tolist()[:3] == [1, 2, 3] and df["rank"].isna().tolist()[3:] == [True, True]
    assert df.loc[0, "val_balanced_accuracy_low"] == pytest.approx(0.7512)

    md = leaderboard_markdown(df)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| rank | entry | checkpoint | status | val bal. acc.")
    assert "p vs leader |" in lines[0] and "wall time" in lines[0] and "test AUROC" in lines[0]
    assert "| 1 | multi_domain | ckpts/md.pt | ok | 0.812 [0.75, 0.87] |" in lines[2]
    assert "1h 02m" in lines[2] and lines[2].endswith("| leader |")
    assert lines[3].endswith("| 2m 05s | <0.001 |")
    assert "— (random init)" in lines[4] and "12.3 s" in lines[4]
    assert lines[-1].startswith("| — | broken | ckpts/b.pt | failed: checkpoint keys do not match |")

    by_loss = leaderboard(
        [{"entry": "a", "val_loss": 0.9}, {"entry": "b", "val_loss": 0.2}], sort_by="val_loss"
    )
    assert list(by_loss["entry"]) == ["b", "a"]
    with pytest.raises(DataError, match="val_balanced_acc"):
        leaderboard([{"entry": "a", "val_accuracy": 0.5}], sort_by="val_balanced_acc")


def test_leaderboard_from_evaluation_summaries(tmp_path, predictions):
    ids, y, probs = predictions
    target = [{"name": "g", "kind": "multiclass", "classes": CLASSES}]
    rng = np.random.default_rng(2)
    worse = rng.dirichlet(np.ones(4), size=len(y))
    good = evaluate_predictions(ids, y, probs, target, tmp_path / "good", n_bootstrap=100)["summary"]
    bad = evaluate_predictions(ids, y, worse, target, tmp_path / "bad", n_bootstrap=100)["summary"]
    metric = headline_metrics("multiclass")["balanced_accuracy"]
    p = p_values_vs_leader(y, {"good": probs, "bad": worse}, "good", metric, n=500)
    rows = [
        leaderboard_row("bad", "b.pt", val=bad, test=bad, epochs=3, wall_time_s=4.0, p_vs_leader=p["bad"]),
        leaderboard_row("good", "g.pt", val=good, test=good, epochs=3, wall_time_s=4.0),
    ]
    df = leaderboard(rows)
    assert list(df["entry"]) == ["good", "bad"]
    csv_path, md_path = write_leaderboard(df, tmp_path)
    assert pd.read_csv(csv_path)["entry"].tolist() == ["good", "bad"]
    text = md_path.read_text()
    ci = good["balanced_accuracy_ci"]
    assert format_ci(good["balanced_accuracy"], *ci) in text
    assert 0.0 <= p["bad"] < 0.05
