"""Evaluation on predictions (numpy / pandas), never on models.

- :mod:`~medctl.evaluation.metrics`: scikit-learn metrics for binary, multiclass and multilabel targets
  (a training loop's per-epoch values come from the vectorised forms in :mod:`~medctl.evaluation.bootstrap`).
- :mod:`~medctl.evaluation.bootstrap`: percentile bootstrap CIs and the paired bootstrap test, vectorised.
- :mod:`~medctl.evaluation.plots`: confusion matrices, training curves, ROC curves as PNG.
- :mod:`~medctl.evaluation.reports`: ``evaluate_predictions`` (all artifacts of one split), with
  ``markdown_to_html`` (:mod:`~medctl.evaluation.markdown`) and the sweep leaderboard
  (:mod:`~medctl.evaluation.leaderboard`).
"""

from medctl.evaluation.bootstrap import (
    Interval,
    Metric,
    bootstrap_ci,
    bootstrap_many,
    headline_metrics,
    paired_bootstrap,
    paired_bootstrap_pvalue,
)
from medctl.evaluation.leaderboard import (
    leaderboard,
    leaderboard_markdown,
    leaderboard_row,
    p_values_vs_leader,
    write_leaderboard,
)
from medctl.evaluation.markdown import markdown_to_html, write_report
from medctl.evaluation.metrics import classification_metrics, multilabel_metrics, target_metrics
from medctl.evaluation.plots import plot_confusion_matrix, plot_roc, plot_training_curves
from medctl.evaluation.reports import evaluate_predictions

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
