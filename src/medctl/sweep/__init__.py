"""Sweeps: one probe / fine-tune recipe over several checkpoints on one frozen split, into a leaderboard.

- :mod:`~medctl.sweep.run`: ``run_sweep(config, ...) -> SweepResult``, the stage (read its docstring).
- :mod:`~medctl.sweep.entries`: which checkpoints, entry names and each entry's config.
- :mod:`~medctl.sweep.state`: ``sweep_state.json`` and the ``done.json`` markers that make it resumable.
- :mod:`~medctl.sweep.records`: the leaderboard rows, p-values vs the leader, ``leaderboard.csv``/``.md``.
"""

from medctl.sweep.entries import SweepEntry
from medctl.sweep.run import EntryOutcome, SweepResult, run_sweep

__all__ = ["EntryOutcome", "SweepEntry", "SweepResult", "run_sweep"]
