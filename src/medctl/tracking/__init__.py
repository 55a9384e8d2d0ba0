"""Experiment tracking beside TensorBoard: each run folder is one MLflow or Weights & Biases run.

A stage makes three calls, and hands the tracker to its :class:`~medctl.training.logging.MetricsLogger`:

1. ``tracker = connect(config.tracking, kind="finetune")`` before any work: a missing library or an
   MLflow server that does not answer is one line and exit 2 here (:class:`~medctl.errors.ConfigError`).
   With ``backend = "none"``, and on every rank but 0 under torchrun, the tracker does nothing.
2. ``tracker.begin(run_dir, resume=resume)`` once the folder holds ``config.toml`` and ``env.json``:
   opens the run (the resolved config, flattened, as parameters; ``env.json``'s provenance and
   ``tracking.tags`` as tags) and stores its id in ``<run_dir>/tracking.json``. ``resume`` continues the
   run that file names, so a resumed run's steps go on in the same tracked run. A folder inside a sweep
   folder whose ``tracking.json`` is a sweep's becomes a child of that run (MLflow: nested; W&B: the
   sweep's group). ``source_run`` (evaluate, saliency) logs into the tracked run of that training folder,
   under the folder's name, or opens a new run linked to it when it was not tracked.
3. ``tracker.finish()``: the final metrics (with their CIs where the folder holds them), the provenance of
   ``results.json`` / ``metrics.json`` as tags, the reports, figures and tables as artifacts
   (:mod:`medctl.tracking.content`; checkpoints only with ``tracking.log_checkpoints``), then the run
   is closed and the user told how to sync what did not reach the server.

Never the reason a run dies: once the run is open, a failing call to the backend is one warning, the
tracker stops sending, counts what it did not send, and the run and its local files go on as if it were
not there. Credentials come from the libraries' own variables and logins only; nothing of them is
written to ``tracking.json`` or printed (a URL's password is hidden).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medctl.config import TrackingConfig
from medctl.errors import ConfigError, redact_url_credentials
from medctl.io import write_json
from medctl.progress import log
from medctl.tracking.backend import Backend, RunSpec
from medctl.tracking.content import artifacts_of, final_metrics_of, params_of, provenance_of
from medctl.training.distributed import is_rank0

TRACKING_FILE = "tracking.json"
INSTALL_HINT = "install it with `uv sync --extra tracking` (or `pip install 'medctl[tracking]'`)"


def connect(settings: TrackingConfig, *, kind: str) -> Tracker:
    """The tracker of one stage (``kind``: pretrain, finetune, sweep, evaluate, saliency), its backend
    imported and its server checked before any work; a do-nothing tracker when tracking is off."""
    if settings.backend == "none" or not is_rank0():
        return Tracker(settings, None, kind)
    backend = _backend_for(settings)
    backend.check()
    return Tracker(settings, backend, kind)


def _backend_for(settings: TrackingConfig) -> Backend:
    try:
        if settings.backend == "mlflow":
            from medctl.tracking.mlflow_backend import MlflowBackend

            return MlflowBackend(settings)
        from medctl.tracking.wandb_backend import WandbBackend

        return WandbBackend(settings)
    except ImportError as exc:
        raise ConfigError(
            [f'backend = "{settings.backend}" needs the {exc.name or settings.backend} package; {INSTALL_HINT}, '
             'or set tracking.backend = "none"'],
            "tracking.backend",
        ) from exc  # fmt: skip


def read_link(folder: Path) -> dict[str, Any]:
    """What ``<folder>/tracking.json`` says (backend, run id, ...), or {} when the folder was not tracked."""
    path = Path(folder) / TRACKING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class Tracker:
    """One tracked run for one folder; every method is a no-op when tracking is off (see the module docstring)."""

    def __init__(self, settings: TrackingConfig, backend: Backend | None, kind: str):
        self.settings = settings
        self.backend = backend
        self.kind = kind
        self.folder: Path | None = None
        self.prefix = ""  # "eval_test/" when logging into the training run of a checkpoint
        self.last_step = 0
        self.lost = ""  # why the backend stopped answering; nothing is sent after that
        self.unsent: dict[str, int] = {}  # what was not sent, by kind: metric values, tags, artifacts
        self._train_step_rows = 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def begin(
        self, folder: str | Path, *, resume: bool = False, source_run: str | Path | None = None
    ) -> None:
        """Open (or, with ``resume``, reopen) the tracked run of ``folder``; see the module docstring."""
        if self.backend is None:
            return
        self.folder = Path(folder)
        spec = self._spec(resume, Path(source_run) if source_run is not None else None)
        # a server lost since connect(): one line and exit 2 here, nothing trained yet
        run_id = self.backend.start(spec)
        link = {
            "backend": self.backend.name, "run_id": run_id, "project": self.settings.project, "kind": self.kind,
            "name": spec.name, "group": spec.group, "parent_run_id": spec.parent_run_id,
            "attached_to": str(source_run) if spec.attached else "", "location": self.backend.location(),
        }  # fmt: skip
        write_json(self.folder / TRACKING_FILE, link)
        verb = "continues" if spec.run_id else "logs to"
        log(
            f"tracking: {self.backend.name} {verb} run {run_id} ({redact_url_credentials(self.backend.location())})"
        )

    def _spec(self, resume: bool, source_run: Path | None) -> RunSpec:
        assert self.folder is not None and self.backend is not None
        folder, settings = self.folder, self.settings
        name = settings.run_name or folder.name
        spec = RunSpec(name=name, job_type=self.kind, folder=folder, tags=dict(settings.tags))
        if source_run is not None:  # evaluate / saliency: into the training run, or a new one linked to it
            source = read_link(source_run)
            spec.tags |= {"medctl.source_run": str(source_run)}
            if source.get("backend") == self.backend.name:
                self.prefix = f"{folder.name}/"
                spec.run_id, spec.attached, spec.name = source["run_id"], True, source.get("name", name)
                return spec
            spec.name = f"{settings.run_name or source_run.name}/{folder.name}"
        own = read_link(folder) if resume else {}
        if own.get("backend") == self.backend.name:
            spec.run_id = own["run_id"]
            return spec
        parent = read_link(folder.parent)
        if parent.get("kind") == "sweep" and parent.get("backend") == self.backend.name:
            spec.parent_run_id, spec.group = parent["run_id"], parent.get("name", folder.parent.name)
            spec.name = f"{spec.group}/{folder.name}"
        elif self.kind == "sweep":
            spec.group = name
        spec.params = params_of(source_run if source_run is not None else folder)
        spec.tags |= provenance_of(folder)
        return spec

    # ------------------------------------------------------------------------------------ while running
    def log_scalars(self, phase: str, scalars: Mapping[str, float], step: int) -> None:
        """A ``metrics.jsonl`` row (the :class:`~medctl.training.logging.ScalarSink` of the fit loop)."""
        if self.backend is None:
            return
        if phase == "train_step":
            self._train_step_rows += 1
            if (self._train_step_rows - 1) % self.settings.log_every:
                return
        values = {
            f"{self.prefix}{phase}/{k}": float(v) for k, v in scalars.items() if math.isfinite(float(v))
        }
        self.last_step = max(self.last_step, int(step))
        self._send("metric values", len(values), self.backend.log_metrics, values, int(step))

    # ------------------------------------------------------------------------------------------- the end
    def finish(self, *, failed: bool = False) -> None:
        """Final metrics, provenance and artifacts of the folder; close the run; say what to sync."""
        if self.backend is None or self.folder is None:
            return
        backend, folder = self.backend, self.folder
        final = {f"{self.prefix}{k}": v for k, v in final_metrics_of(folder).items()}
        self._send("metric values", len(final), backend.log_summary, final, self.last_step)
        tags = {f"{self.prefix}{k}": v for k, v in provenance_of(folder).items()}
        self._send("tags", len(tags), backend.set_tags, tags)
        for path in artifacts_of(folder, checkpoints=self.settings.log_checkpoints):
            where = str(Path(self.prefix.rstrip("/")) / path.parent.relative_to(folder)).strip(".")
            self._send("artifacts", 1, backend.log_artifact, path, where)
        self._send("run ends", 1, backend.finish, failed)
        if self.lost:
            sent_nothing = ", ".join(f"{n} {what}" for what, n in self.unsent.items())
            log(
                f"warning: tracking: not sent to {backend.name} run {read_link(folder).get('run_id')}: {sent_nothing}; "
                f"every one is in {folder} (metrics.jsonl, results.json, the reports). "
                f"{backend.sync_hint(folder)}"
            )
        elif hint := backend.offline_hint():
            log(f"tracking: {hint}")
        self.folder = None

    def _send(self, what: str, count: int, call: Callable[..., None], *args: Any) -> None:
        """Call the backend; a failure is one warning, and after it nothing more is sent (only counted)."""
        if self.lost:
            self.unsent[what] = self.unsent.get(what, 0) + count
            return
        try:
            call(*args)
        except Exception as exc:  # any failure of a tracking library or its server: recorded, never fatal
            self.lost = redact_url_credentials(
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            self.unsent[what] = self.unsent.get(what, 0) + count
            assert self.backend is not None
            log(
                f"warning: tracking: {self.backend.name} stopped answering ({self.lost[:200]}); the run goes on "
                "without it and its local files stay complete"
            )
