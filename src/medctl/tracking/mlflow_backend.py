"""MLflow: a run in the experiment ``tracking.project`` on ``tracking.uri`` (else MLFLOW_TRACKING_URI).

Talks through :class:`mlflow.MlflowClient` only (no global active run), so a sweep's parent run stays
open while its entries' runs come and go; an entry is nested under the sweep's run by MLflow's own
``mlflow.parentRunId`` tag. MLflow retries a failing request 7 times with a growing backoff (minutes);
unless the user set them, medctl asks for 2 retries and a 10 s timeout, so a lost server costs the run
seconds once (the tracker stops sending after the first failure).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

from medctl.config import TrackingConfig
from medctl.errors import ConfigError, redact_url_credentials
from medctl.tracking.backend import RunSpec

# the library's own variables, set only where the user has not
PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # fmt: skip
MAX_PARAM_LENGTH = 6000  # MLflow refuses longer parameter values
MAX_TAG_LENGTH = 8000
BATCH = 100  # MLflow's limit on parameters per log_batch call


class MlflowBackend:
    name = "mlflow"

    def __init__(self, settings: TrackingConfig):
        import mlflow
        from mlflow import MlflowClient

        for key, value in PATIENCE.items():
            os.environ.setdefault(key, value)
        self.settings = settings
        self.uri = settings.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = ""

    def location(self) -> str:
        return redact_url_credentials(self.uri)

    def check(self) -> None:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # whatever the client raises for a server that does not answer
            raise ConfigError(
                [f"the MLflow server at {self.location()} does not answer ({type(exc).__name__}); start it, fix "
                 "tracking.uri (or MLFLOW_TRACKING_URI), or set tracking.backend = \"none\""],
                "tracking.uri",
            ) from exc  # fmt: skip

    def start(self, spec: RunSpec) -> str:
        from mlflow.entities import Param, RunTag

        try:
            if spec.run_id:
                self.run_id = spec.run_id
                if not spec.attached:
                    self.client.update_run(self.run_id, status="RUNNING")
            else:
                tags = dict(spec.tags) | {"mlflow.runName": spec.name, "medctl.stage": spec.job_type}
                if spec.parent_run_id:
                    tags["mlflow.parentRunId"] = spec.parent_run_id
                if spec.group:
                    tags["medctl.group"] = spec.group
                run = self.client.create_run(self._experiment_id(), run_name=spec.name, tags=_clipped(tags))
                self.run_id = run.info.run_id
                params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in spec.params.items()]
                for i in range(0, len(params), BATCH):
                    self.client.log_batch(self.run_id, params=params[i : i + BATCH])
            if spec.run_id and spec.tags:
                self.client.log_batch(
                    self.run_id, tags=[RunTag(k, v) for k, v in _clipped(spec.tags).items()]
                )
        except Exception as exc:  # the server went away since check(): still before any training
            raise ConfigError(
                [f"the MLflow server at {self.location()} refused the run ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else ''}); fix tracking.uri or set tracking.backend = \"none\""],
                "tracking.uri",
            ) from exc  # fmt: skip
        return self.run_id

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.settings.project)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.settings.project)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit on metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_summary(self, values: dict[str, float], step: int) -> None:
        self.log_metrics(values, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _clipped(tags).items()])

    def log_artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def finish(self, failed: bool) -> None:
        # MLflow prints the run's URL to stdout, with any password the tracking URI holds: not here
        with contextlib.redirect_stdout(io.StringIO()):
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def sync_hint(self, folder: Path) -> str:
        return (
            f"MLflow has no offline log to replay: run {self.run_id} on {self.location()} holds what was sent "
            "before the server was lost"
        )

    def offline_hint(self) -> str:
        return ""


def _clipped(tags: dict[str, str]) -> dict[str, str]:
    return {k: str(v)[:MAX_TAG_LENGTH] for k, v in tags.items()}
