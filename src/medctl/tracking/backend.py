"""The one small interface every tracking backend implements (MLflow, W&B), and the run it opens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class RunSpec:
    """The run to open: a new one (``run_id`` ""), or ``run_id`` again (a resume, or ``attached``: an
    evaluation logging into its checkpoint's training run)."""

    name: str
    job_type: str  # the stage: pretrain, finetune, sweep, evaluate, saliency
    folder: Path  # the run folder (W&B keeps its offline files in <folder>/wandb/)
    run_id: str = ""
    attached: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # a new run's resolved config, flattened
    tags: dict[str, str] = field(default_factory=dict)
    group: str = ""  # a sweep's name: the sweep and its entries share it
    parent_run_id: str = ""  # a sweep entry's parent run


class Backend(Protocol):
    name: str  # "mlflow" | "wandb"

    def check(self) -> None:
        """Raise a ConfigError (one line, exit 2) when the server cannot be used; called before any work."""

    def location(self) -> str:
        """Where runs go (a server URL or a folder), for messages and tracking.json; no credentials."""

    def start(self, spec: RunSpec) -> str:
        """Open the run (a ConfigError when that fails) and return its id."""

    def log_metrics(self, values: dict[str, float], step: int) -> None: ...

    def log_summary(self, values: dict[str, float], step: int) -> None:
        """Final figures (W&B: the run summary)."""

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, folder: str) -> None:
        """One file, under ``folder`` ("" : the artifacts' root)."""

    def finish(self, failed: bool) -> None: ...

    def sync_hint(self, folder: Path) -> str:
        """How to get what was not sent to the server there, after the server was lost."""

    def offline_hint(self) -> str:
        """How to upload a run that was logged offline (W&B offline mode), or ""."""
