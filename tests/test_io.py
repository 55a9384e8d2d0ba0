"""medctl.io: one atomic write contract, one JSON policy (strict JSON: non-finite -> null), one number format."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medctl.analysis.reports import evaluate_predictions
from medctl.errors import ConfigError
from medctl.io import (
    MISSING,
    atomic_write,
    dumps_json,
    format_number,
    markdown_cell,
    markdown_table,
    process_alive,
    remove_stale_temps,
    temp_path,
    write_json,
)
from medctl.runs import write_results_and_timing
from medctl.training.logging import MetricsLogger
from medctl.training.precision import resolve_device

PAYLOAD = {
    "nan": math.nan,
    "inf": math.inf,
    "minus_inf": -math.inf,
    "np_nan": np.float32("nan"),
    "np_float": np.float64(0.25),
    "np_int": np.int64(7),
    "np_bool": np.bool_(True),
    "array": np.array([1.0, np.nan, 3.0]),
    "tuple": (1, math.inf),
    "path": Path("/tmp/x"),
    "nested": {"deep": [{"value": np.float16("inf")}]},
}
EXPECTED = {
    "nan": None,
    "inf": None,
    "minus_inf": None,
    "np_nan": None,
    "np_float": 0.25,
    "np_int": 7,
    "np_bool": True,
    "array": [1.0, None, 3.0],
    "tuple": [1, None],
    "path": "/tmp/x",
    "nested": {"deep": [{"value": None}]},
}


def strict(text: str):
    """json.loads that refuses NaN / Infinity (what Python's json would otherwise accept)."""

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_writers_write_strict_json_with_non_finite_as_null(tmp_path):
    write_json(tmp_path / "a.json", PAYLOAD)
    assert strict((tmp_path / "a.json").read_text()) == EXPECTED
    assert strict(dumps_json(PAYLOAD, indent=None)) == EXPECTED
    with pytest.raises(ValueError, match="NaN"):
        strict(json.dumps({"x": math.nan}))  # the check itself bites on what json.dumps writes


def test_run_files_are_strict_json(tmp_path):
    results = {"best_val_loss": math.nan, "auc": np.float32(0.5), "wall_time_s": math.inf,
               "history": [{"epoch": 1, "loss": math.inf, "epoch_time_s": np.float64(1.5)}]}  # fmt: skip
    write_results_and_timing(tmp_path, results)
    assert strict((tmp_path / "results.json").read_text()) == {
        "best_val_loss": None, "auc": 0.5, "history": [{"epoch": 1, "loss": None}]
    }  # fmt: skip
    assert strict((tmp_path / "timing.json").read_text())["wall_time_s"] is None

    logger = MetricsLogger(tmp_path, enabled=True)
    logger._tb = lambda: type("NoBoard", (), {"add_scalar": lambda *a: None})()
    logger.log("train", {"loss": torch.tensor(float("nan")), "lr": 0.1}, epoch=1, step=1)
    row = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] is None and row["lr"] == 0.1


def test_evaluation_metrics_json_is_strict(tmp_path):
    # one class only in y_true: AUC is undefined (NaN) and must come out as null
    payload = evaluate_predictions(
        ids=["a", "b", "c"],
        y_true=np.array([0, 0, 0]),
        probs=np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]),
        targets=[{"name": "label", "kind": "multiclass", "classes": ["no", "yes"]}],
        out_dir=tmp_path,
        n_bootstrap=20,
    )
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and strict(text)["n_samples"] == 3
    assert payload["n_samples"] == 3


def test_atomic_write_keeps_the_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with atomic_write(target, "w") as fh:
        fh.write("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as fh:
        fh.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_stale_temps_of_dead_processes_go_those_of_live_ones_stay(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    assert not process_alive(dead_pid)
    stale = tmp_path / f".last.ckpt.tmp{dead_pid}"
    live = tmp_path / f".results.json.tmp{os.getppid()}"  # our parent runs
    own = temp_path(tmp_path / "metrics.json")  # an earlier failed write of this very process
    kept = tmp_path / "notes.tmp123"  # not one of ours: no leading dot
    for path in (stale, live, own, kept):
        path.write_text("x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted([stale, own])
    assert live.exists() and kept.exists()


def test_one_number_format():
    assert format_number(0.81234) == "0.812" and format_number(np.float32(0.5), 2) == "0.50"
    assert format_number(3, 1) == "3.0"
    for missing in (None, math.nan, math.inf, "0.5", True):
        assert format_number(missing) == MISSING == "—"


def test_one_markdown_table_escapes_every_cell_the_same_way():
    lines = markdown_table(["class", "n"], [["a|b", 3], ["two\nlines", format_number(math.nan)]], "lr")
    assert lines == ["| class | n |", "| --- | ---: |", "| a\\|b | 3 |", "| two lines | — |"]
    assert markdown_cell("x\r\ny|z") == "x y\\|z"
    with pytest.raises(ValueError, match="2 columns"):
        markdown_table(["a", "b"], [], "l")


def test_one_device_resolver_names_run_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(ConfigError, match=r"`run\.device` = 'tpu9' is not a device; use auto, cpu, cuda"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"`run\.device` = 'cuda' but no CUDA device is visible"):
            resolve_device("cuda")
