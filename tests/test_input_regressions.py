"""Bad-input and fault findings of issue 15 (items 4, 8, 9, 10, 12), each kept as a regression test
through the CLI: class names that look like NA, credentials inside an endpoint URL, environment
overrides in `evaluate`/`saliency`, declared dependency bounds, and axis order of NRRD volumes."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import socket
import tomllib
from pathlib import Path

import nrrd
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), catch_exceptions=False, env=env)


# ------------------------------------------------------------------------ item 4: "None" is a class
def test_a_class_named_none_or_na_is_a_value_not_an_empty_cell(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=18, n_classes=3, size=(8, 16, 16), seed=4)
    table = pd.read_csv(ds.table, sep="\t", dtype=str, keep_default_na=False)
    table["label"] = table["label"].map({"healthy": "None", "mild": "NA", "severe": "severe"})
    table.to_csv(ds.table, sep="\t", index=False)
    classes = 'data.targets=[{name="label", kind="multiclass", classes=["None", "NA", "severe"]}]'
    overrides = [o for o in ds.config_overrides() if not o.startswith("data.targets=")] + [classes]

    checked = invoke("check", "data", *overrides)
    assert checked.exit_code == 0, checked.output
    assert "classes: None, NA, severe" in checked.output

    built = invoke("preprocess", "--workers", "1", *overrides)
    assert built.exit_code == 0, built.output
    summary = json.loads(next(Path(ds.cache_dir).rglob("summary.json")).read_text())
    assert summary["targets"][0]["classes"] == ["None", "NA", "severe"]
    written = dict(zip(table["participant_id"], table["label"], strict=True))
    manifest = pd.read_parquet(next(Path(ds.cache_dir).rglob("manifest.parquet")))
    for sample_id, index in zip(manifest["id"], manifest["label"], strict=True):
        assert ["None", "NA", "severe"][int(index)] == written[sample_id]


def test_an_empty_label_cell_is_still_missing(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, size=(8, 16, 16), seed=4)
    table = pd.read_csv(ds.table, sep="\t", dtype=str, keep_default_na=False)
    table.loc[0, "label"] = ""
    table.loc[0, "retinal_oct"] = "TRUE"
    table.to_csv(ds.table, sep="\t", index=False)
    checked = invoke("check", "data", *ds.config_overrides())
    assert checked.exit_code == 2
    assert f"column 'label' (data.targets[0].column) is empty for 1 id(s) ({table.loc[0, 'participant_id']})" in (
        " ".join(checked.output.split())
    )


# ------------------------------------------------------------- item 8: passwords in endpoint URLs
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_password_in_s3_endpoint_url_is_never_printed(s3_server, tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=6, size=(8, 16, 16), seed=5)
    overrides = [
        *(o for o in ds.config_overrides() if not o.startswith("data.source.root=")),
        'data.source.root="s3://never-made/images/"',
    ]
    port = s3_server.rsplit(":", 1)[1]
    for url in (f"http://alice:s3cr3t-pass@127.0.0.1:{port}", f"http://alice:s3cr3t-pass@127.0.0.1:{closed_port()}"):
        result = invoke("check", "bucket", *overrides, env={"S3_ENDPOINT_URL": url})
        assert "s3cr3t-pass" not in result.output, result.output
        assert "alice:***@127.0.0.1" in result.output


def test_a_password_in_the_config_endpoint_is_refused_without_echoing_it(tmp_path):
    result = invoke("check", "config", 'data.source.endpoint_url="https://bob:hunter2-xyz@minio.lab:9000"')
    assert result.exit_code == 2
    assert "hunter2-xyz" not in result.output
    assert "data.source.endpoint_url" in result.output and "AWS_SECRET_ACCESS_KEY" in result.output


# ------------------------------------------------------ item 9: evaluate/saliency read MEDCTL_* too
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("env_layers")
    ds = make_synthetic_dataset(root / "ds", n=12, size=(8, 16, 16), seed=6)
    result = invoke(
        "finetune", *ds.config_overrides(), 'model.encoder="vit3d_test"', "train.epochs=1", "data.batch_size=4",
        'run.device="cpu"', f"run.root={json.dumps(str(root / 'runs'))}", 'run.name="env"',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "runs" / "env" / "checkpoints" / "best.ckpt"


def test_evaluate_reads_environment_overrides(classifier, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", "--ckpt", str(classifier), "--out", str(out), env={"MEDCTL_TRAIN__BOOTSTRAP": "7"})
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n_bootstrap"] == 7


def test_saliency_reads_environment_overrides(classifier, tmp_path):
    out = tmp_path / "maps"
    result = invoke(
        "saliency", "--ckpt", str(classifier), "--out", str(out), "--method", "gradients",
        env={"MEDCTL_SALIENCY__MAX_SAMPLES": "1", "MEDCTL_SALIENCY__RANDOMISATION_CHECK": "false"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "index.csv")) == 1


def test_evaluate_names_a_bad_environment_value(classifier, tmp_path):
    result = invoke("evaluate", "--ckpt", str(classifier), "--out", str(tmp_path), env={"MEDCTL_TRAIN__BOOTSTRAP": "-3"})
    assert result.exit_code == 2
    assert "train.bootstrap" in result.output


# ------------------------------------------------------------ item 10: real, declared dependencies
def _declared() -> dict[str, str]:
    """Distribution name (normalised) -> its requirement string in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        declared[name.lower().replace("_", "-")] = requirement
    return declared


def _imported_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "src" / "medctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_package_is_declared():
    import sys

    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    for module in sorted(_imported_modules() - set(sys.stdlib_module_names) - {"medctl", "__future__"}):
        names = [d.lower().replace("_", "-") for d in distributions.get(module, [module])]
        if not any(name in declared for name in names):
            undeclared.append(f"{module} ({', '.join(names)})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_declared_lower_bounds_cover_the_apis_the_code_uses():
    declared = _declared()
    assert re.search(r">=\s*3", declared["pydicom"]), declared["pydicom"]  # pydicom.pixels is 3.0+
    source = (ROOT / "src" / "medctl" / "data" / "readers.py").read_text()
    assert "pydicom.pixels" in source


def test_check_env_names_every_dependency_and_whether_it_meets_its_bound(tmp_path):
    result = invoke("check", "env", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"pydicom \S+ \(>=3\.0\)", text), text
    assert "dependencies" in text and "meet the lower bounds" in text


# -------------------------------------------------------------------------- item 12: axis order
@pytest.fixture
def numpy_order_nrrds(tmp_path):
    """NRRDs written from numpy (16, 64, 64) arrays with pynrrd's defaults (file axes = numpy axes)."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        sid = f"s{i:02d}"
        nrrd.write(str(images / f"{sid}.nrrd"), rng.normal(size=(16, 64, 64)).astype(np.float32))
        rows.append({"participant_id": sid, "label": ["a", "b"][i % 2], "split": ["train", "val", "test", "train"][i % 4]})
    pd.DataFrame(rows).to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    return [
        f"data.table={json.dumps(str(tmp_path / 't.tsv'))}",
        f"data.source.root={json.dumps(str(images))}",
        'data.source.pattern="{participant_id}.nrrd"',
        'data.split_column="split"',
        'data.targets=[{name="label", kind="binary", classes=["a", "b"]}]',
        f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
    ]


def test_check_bucket_names_the_axes_and_spacing_of_the_shape(numpy_order_nrrds):
    result = invoke("check", "bucket", *numpy_order_nrrds)
    text = " ".join(result.output.split())
    assert "shape (C=1, D=64, H=64, W=16)" in text, text
    assert "spacing (D 1, H 1, W 1) mm" in text


def test_a_spatial_size_that_distorts_the_aspect_ratio_is_warned(numpy_order_nrrds):
    distorting = [*numpy_order_nrrds, "data.preprocess.spatial_size=[16, 64, 64]"]
    checked = invoke("check", "data", *distorting)
    text = " ".join(checked.output.split())
    assert "spatial_size [16, 64, 64]" in text and "16x" in text, text
    assert "D=64, H=64, W=16" in text and "[64, 64, 16]" in text  # the size that keeps the aspect
    built = invoke("preprocess", "--workers", "1", *distorting)
    assert built.exit_code == 0, built.output
    assert "spatial_size [16, 64, 64]" in " ".join(built.output.split())

    faithful = invoke("check", "data", *numpy_order_nrrds, "data.preprocess.spatial_size=[32, 32, 8]")
    assert faithful.exit_code == 0, faithful.output
    assert "aspect" not in faithful.output
