"""``medctl evaluate``, the stage: a trained classifier on one split -> predictions, metrics, a report.

- :mod:`~medctl.evaluate.stage`: ``run_evaluate(checkpoint, ...) -> EvaluateResult`` (read its docstring).

The metrics, bootstrap intervals, figures and reports it writes come from the library
:mod:`medctl.analysis`; logits and probabilities from :mod:`medctl.training.predict`.
"""

from medctl.evaluate.stage import EvaluateResult, run_evaluate

__all__ = ["EvaluateResult", "run_evaluate"]
