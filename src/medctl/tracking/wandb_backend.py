"""Weights & Biases: a run in ``tracking.project``, its local files in ``<run folder>/wandb/``.

Online or offline is W&B's own choice (``WANDB_MODE``; the key from ``WANDB_API_KEY`` or ``wandb login``).
Every metric is plotted against medctl's optimizer step (``define_metric(step_metric="step")``) rather
than W&B's internal counter, so a resumed run goes on at the step it reached and an evaluation logged
into its training run later needs no step of its own. A sweep and its entries share the sweep's
``group``; ``job_type`` is the stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medctl.config import TrackingConfig
from medctl.errors import ConfigError
from medctl.tracking.backend import RunSpec

STEP = "step"


class WandbBackend:
    name = "wandb"

    def __init__(self, settings: TrackingConfig):
        import wandb

        # W&B's own chatter (a warning per saved file) off unless the user asks; medctl says what matters
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.settings = settings
        self.run: Any = None

    def location(self) -> str:
        mode = self.run.settings.mode if self.run is not None else "W&B"
        return f"{self.settings.project} ({mode})"

    def check(self) -> None:
        """W&B checks its server and key itself when the run opens (:meth:`start`), before any training."""

    def start(self, spec: RunSpec) -> str:
        wandb = self.wandb
        (spec.folder / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=self.settings.project,
                name=spec.name,
                id=spec.run_id or None,
                resume="allow" if spec.run_id else None,
                dir=str(spec.folder),
                config=spec.params or None,
                tags=[f"{k}:{v}"[:64] for k, v in self.settings.tags.items()] or None,
                group=spec.group or None,
                job_type=spec.job_type,
                reinit="create_new",  # a sweep's run stays open while its entries' runs open and close
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        except Exception as exc:  # no key, no server: before any training
            raise ConfigError(
                [f"W&B could not open the run ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                 "log in (`wandb login` or WANDB_API_KEY), run offline with WANDB_MODE=offline, or set "
                 'tracking.backend = "none"'],
                "tracking.backend",
            ) from exc  # fmt: skip
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        provenance = {k: v for k, v in spec.tags.items() if k.startswith("medctl.")}
        if provenance:
            self.run.config.update(provenance, allow_val_change=True)
        return self.run.id

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, STEP: step})

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.config.update(tags, allow_val_change=True)

    def log_artifact(self, path: Path, folder: str) -> None:
        base = path.parents[len(Path(folder).parts)]  # the file keeps its place under `folder`
        self.run.save(str(path), base_path=str(base), policy="now")

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def sync_hint(self, folder: Path) -> str:
        return f"upload the run with `wandb sync {self._sync_dir()}`"

    def offline_hint(self) -> str:
        if self.run is None or self.run.settings.mode != "offline":
            return ""
        return f"W&B ran offline; upload the run with `wandb sync {self._sync_dir()}`"

    def _sync_dir(self) -> str:
        return str(self.run.settings.sync_dir) if self.run is not None else "<run folder>/wandb/offline-run-*"
