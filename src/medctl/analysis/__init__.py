"""Evaluation on predictions (numpy / pandas), never on models.

- :mod:`~medctl.analysis.metrics`: scikit-learn metrics for binary, multiclass and multilabel targets
  (a training loop's per-epoch values come from the vectorised forms in :mod:`~medctl.analysis.bootstrap`).
- :mod:`~medctl.analysis.bootstrap`: percentile bootstrap CIs and the paired bootstrap test, vectorised.
- :mod:`~medctl.analysis.plots`: confusion matrices, training curves, ROC curves as PNG.
- :mod:`~medctl.analysis.reports`: ``evaluate_predictions`` (all artifacts of one split), with
  ``markdown_to_html`` (:mod:`~medctl.analysis.markdown`) and the sweep leaderboard
  (:mod:`~medctl.analysis.leaderboard`).
"""

from medctl.analysis.bootstrap import (
    Interval,
    Metric,
    bootstrap_ci,
    bootstrap_many,
    headline_metrics,
    paired_bootstrap,
    paired_bootstrap_pvalue,
)
from medctl.analysis.leaderboard import (
    leaderboard,
    leaderboard_markdown,
    leaderboard_row,
    p_values_vs_leader,
    write_leaderboard,
)
from medctl.analysis.markdown import markdown_to_html, write_report
from medctl.analysis.metrics import classification_metrics, multilabel_metrics, target_metrics
from medctl.analysis.plots import plot_confusion_matrix, plot_roc, plot_training_curves
from medctl.analysis.reports import evaluate_predictions

__all__ = [
    "Interval",
    "Metric",
    "bootstrap_ci",
    "bootstrap_many",
    "classification_metrics",
    "evaluate_predictions",
    "headline_metrics",
    "leaderboard",
    "leaderboard_markdown",
    "leaderboard_row",
    "markdown_to_html",
    "multilabel_metrics",
    "p_values_vs_leader",
    "paired_bootstrap",
    "paired_bootstrap_pvalue",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_training_curves",
    "target_metrics",
    "write_leaderboard",
    "write_report",
]
