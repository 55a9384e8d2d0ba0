"""[tracking] backend = "mlflow" against a real `mlflow server` on 127.0.0.1 (SQLite store), read back with
MlflowClient: a finetune killed with SIGKILL, resumed and extended is one run with continuous steps, its
evaluation lands in it with CIs; a sweep is a parent run with a child per entry; a server lost mid-run is a
warning; one that does not answer at the start is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import medctl.training.fit as fit_module
from cli_support import one_error_line
from conftest import free_port
from medctl.cli.app import app
from medctl.models.checkpoints import encoder_payload, save_checkpoint
from medctl.models.registry import build_encoder
from medctl.training.logging import read_metrics

mlflow = pytest.importorskip("mlflow")
runner = CliRunner()
SECRET = "pw-7f3a9c-never-printed"
TINY = [
    'data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"', 'model.encoder="vit3d_test"',
    "data.batch_size=4", "train.warmup_epochs=0", "train.log_every=1", "train.patience=0", "train.bootstrap=50",
    'tracking.backend="mlflow"',
]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` (SQLite store, artifacts served by it) on a free port for the module."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its workers go down with it
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()[-2000:]
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown is slow on a loaded machine
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    log.close()


@pytest.fixture
def tracked(mlflow_server, monkeypatch, request):
    """Settings pointing at the module's server, an experiment of the test's own, and a password set the
    way MLflow reads it (the server does not check it; it must appear nowhere)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "lab")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    # one retry: a pooled connection the server closed while idle is retried, as medctl's default does
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    return [f'tracking.project="{request.node.name[:60]}"']


def client(url: str):
    return mlflow.MlflowClient(tracking_uri=url)


def runs_of(url: str, experiment: str):
    found = client(url).get_experiment_by_name(experiment)
    return client(url).search_runs([found.experiment_id]) if found else []


def assert_no_secret(folder: Path, *outputs: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for output in outputs:
        assert SECRET not in output


def test_a_killed_and_resumed_finetune_is_one_run_with_continuous_steps_params_artifacts_and_eval_cis(
    synthetic_3d, tmp_path, tracked, mlflow_server
):
    root = tmp_path / "runs"
    args = [
        "finetune", "-c", "config/finetune/linear_probe.toml", *synthetic_3d.config_overrides(), *TINY, *tracked,
        "train.epochs=4", f"run.root={json.dumps(str(root))}", 'run.name="ft"',
    ]  # fmt: skip
    # 1. SIGKILL right after epoch 2's last.ckpt: no atexit, no end of the tracked run
    killer = textwrap.dedent(
        """
        import os, signal, sys
        import medctl.training.fit as fit_module
        save = fit_module.save_train_state
        def save_then_die(path, **kw):
            save(path, **kw)
            if kw["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        fit_module.save_train_state = save_then_die
        from medctl.cli.app import app
        app(sys.argv[1:])
        """
    )
    killed = subprocess.run([sys.executable, "-c", killer, *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = root / "ft"
    first_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert client(mlflow_server).get_run(first_id).info.status == "RUNNING"  # nobody ended it

    # 2. --resume continues the same tracked run
    resumed = runner.invoke(app, [*args, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert f"continues run {first_id}" in resumed.output
    runs = runs_of(mlflow_server, tracked[0].split('"')[1])
    assert [r.info.run_id for r in runs] == [first_id]
    run = client(mlflow_server).get_run(first_id)
    assert run.info.status == "FINISHED"

    # parameters: the resolved config, flattened; provenance tags: what results.json and env.json hold
    results = json.loads((run_dir / "results.json").read_text())
    assert run.data.params["train.epochs"] == "4" and run.data.params["model.encoder"] == "vit3d_test"
    assert run.data.tags["medctl.split_manifest_hash"] == results["split_manifest_hash"]
    assert run.data.tags["medctl.cache_fingerprint"] == results["cache_fingerprint"]
    assert run.data.tags["medctl.git_sha"] == str(json.loads((run_dir / "env.json").read_text())["git_sha"])

    # every scalar of metrics.jsonl at its step, the killed epochs and the resumed ones without a gap
    epochs = read_metrics(run_dir, "train")
    history = client(mlflow_server).get_metric_history(first_id, "train/loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [
        (row["step"], round(row["loss"], 6)) for row in epochs
    ]
    steps = [row["step"] for row in epochs]
    assert len(steps) == 4 and steps == [steps[0] * (i + 1) for i in range(4)]
    step_rows = client(mlflow_server).get_metric_history(first_id, "train_step/loss")
    assert sorted({m.step for m in step_rows}) == list(range(1, steps[-1] + 1))
    assert run.data.metrics["final/balanced_accuracy"] == pytest.approx(results["metrics"]["balanced_accuracy"])
    artifacts = {a.path for a in client(mlflow_server).list_artifacts(first_id)}
    assert {"config.toml", "env.json", "results.json", "figures"} <= artifacts
    assert "checkpoints" not in artifacts  # tracking.log_checkpoints is off

    # 3. --resume --extend goes on in the same run, its steps after the fourth epoch's
    extended = runner.invoke(app, [*args, "train.epochs=5", "--resume", "--extend"], catch_exceptions=False)
    assert extended.exit_code == 0, extended.output
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == first_id
    history = client(mlflow_server).get_metric_history(first_id, "train/loss")
    assert sorted(m.step for m in history) == [steps[0] * (i + 1) for i in range(5)]

    # 4. evaluate logs into the checkpoint's run: headline metrics with their CIs, the report as artifacts
    evaluated = runner.invoke(
        app, ["evaluate", "--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--split", "test"],
        catch_exceptions=False,
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads((run_dir / "eval_test" / "metrics.json").read_text())["summary"]
    metrics = client(mlflow_server).get_run(first_id).data.metrics
    low, high = summary["balanced_accuracy_ci"]
    assert metrics["eval_test/balanced_accuracy"] == pytest.approx(summary["balanced_accuracy"])
    assert (metrics["eval_test/balanced_accuracy_ci_low"], metrics["eval_test/balanced_accuracy_ci_high"]) == (
        pytest.approx(low), pytest.approx(high)
    )
    eval_files = {a.path for a in client(mlflow_server).list_artifacts(first_id, "eval_test")}
    assert {"eval_test/report.md", "eval_test/report.html", "eval_test/metrics.json"} <= eval_files
    figures = {a.path for a in client(mlflow_server).list_artifacts(first_id, "eval_test/figures")}
    assert any(path.endswith(".png") and "confusion" in path for path in figures), figures
    assert_no_secret(root, killed.stdout + killed.stderr, resumed.output, extended.output, evaluated.output)


def test_a_sweep_is_a_parent_run_with_one_child_per_entry(synthetic_3d, tmp_path, tracked, mlflow_server):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.manual_seed(1)
    encoder = build_encoder("vit3d_test", input_size=[16, 32, 32])
    save_checkpoint(folder / "byol_a.pt", encoder_payload(encoder, name="vit3d_test", args=encoder.build_args))
    result = runner.invoke(
        app,
        ["sweep", "-c", "config/sweep.toml", "--all-checkpoints", *synthetic_3d.config_overrides(), *TINY, *tracked,
         "train.epochs=2", "sweep.bootstrap=20", f"sweep.checkpoint_dir={json.dumps(str(folder))}",
         f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="sw"'],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = {r.info.run_id: r for r in runs_of(mlflow_server, tracked[0].split('"')[1])}
    parent_id = json.loads((tmp_path / "runs" / "sw" / "tracking.json").read_text())["run_id"]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["sw/byol_a", "sw/random_init"]
    assert set(runs) == {parent_id} | {r.info.run_id for r in children}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for child in children:  # each entry's run holds its training curve and its val/test evaluation
        assert child.data.metrics["val/balanced_accuracy"] >= 0
        assert "eval_test/balanced_accuracy_ci_low" in child.data.metrics
    board = {a.path for a in client(mlflow_server).list_artifacts(parent_id)}
    assert {"leaderboard.md", "leaderboard.csv"} <= board


class Relay:
    """A TCP relay in front of the server, which a test can cut (the server itself stays up for others)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                inbound.close()
                return
            outbound = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones (the client's keep-alive pool)."""
        self.open = False
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self.listener.close()
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its other end
            connection.close()


def test_a_server_lost_mid_run_is_a_warning_and_the_run_finishes_with_every_local_file(
    synthetic_3d, tmp_path, tracked, mlflow_server, monkeypatch
):
    relay = Relay(int(mlflow_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{relay.port}")
    save = fit_module.save_train_state

    def save_then_lose_the_server(path, **kw):
        save(path, **kw)
        if kw["epoch"] == 0:
            relay.cut()

    monkeypatch.setattr(fit_module, "save_train_state", save_then_lose_the_server)
    run_dir = tmp_path / "runs" / "lost"
    result = runner.invoke(
        app,
        ["finetune", "-c", "config/finetune/linear_probe.toml", *synthetic_3d.config_overrides(), *TINY, *tracked,
         "train.epochs=3", f"run.root={json.dumps(str(run_dir.parent))}", 'run.name="lost"'],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: tracking: mlflow stopped answering" in result.output
    assert "not sent to mlflow run" in result.output and str(run_dir) in " ".join(result.output.split())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 3 and len(read_metrics(run_dir, "val")) == 3
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "figures/training_curves.png", "val_preds.parquet"):
        assert (run_dir / name).is_file(), name
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    sent = client(mlflow_server).get_metric_history(run_id, "val/loss")
    assert len(sent) == 1  # epoch 1 went out before the cut; 2 and 3 are only local


def test_an_unreachable_server_is_one_line_and_exit_2_before_any_work(synthetic_3d, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nobody = f"http://lab:{SECRET}@127.0.0.1:{free_port()}"
    result = runner.invoke(
        app,
        ["finetune", "-c", "config/finetune/linear_probe.toml", *synthetic_3d.config_overrides(), *TINY,
         f'tracking.uri="{nobody}"', f"run.root={json.dumps(str(tmp_path / 'runs'))}", 'run.name="never"'],
    )  # fmt: skip
    line = one_error_line(result)
    assert "tracking.uri" in line and "does not answer" in line and "lab:***@127.0.0.1" in line
    assert SECRET not in result.output
    assert not (tmp_path / "runs").exists()  # nothing was started
