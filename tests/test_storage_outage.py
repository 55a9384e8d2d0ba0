"""A storage outage mid-preprocess is not bad data: exit 1 with one line, stages refuse the incomplete
cache, and the next run after the endpoint returns fetches only what is missing (moto's real server)."""

from __future__ import annotations

import json
import re

import pandas as pd
from typer.testing import CliRunner

import medctl.data.preprocess as preprocess_module
from medctl.cli.app import app
from medctl.config import load_config
from medctl.data.preprocess import cache_dir_for
from medctl.data.synthetic import make_synthetic_dataset
from medctl.storage import filesystem

runner = CliRunner()


def test_an_outage_mid_run_exits_1_with_one_line_and_the_rerun_completes(
    flaky_endpoint, tmp_path, monkeypatch
):
    ds = make_synthetic_dataset(tmp_path / "ds", n=24, seed=4)
    import boto3

    boto3.client("s3", endpoint_url=flaky_endpoint.url).create_bucket(Bucket="outage")
    fs = filesystem("s3://outage")
    for path in ds.image_root.iterdir():
        fs.put_file(str(path), f"outage/images/{path.name}")
    overrides = [
        *[
            o
            for o in ds.config_overrides()
            if not o.startswith(("data.source.root=", "data.source.mask_root="))
        ],
        'data.source.root="s3://outage/images/"',
        'data.source.mask_root=""',
        "data.source.retries=1",
        f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
        f"data.download_dir={json.dumps(str(tmp_path / 'downloads'))}",
    ]
    n_ids = 22  # 24 rows, 2 filtered out
    calls = []
    real = preprocess_module.process_sample

    def stop_after_five(task):
        calls.append(task.id)
        if len(calls) == 6:
            flaky_endpoint.stop()  # the endpoint goes away for real: connections are refused
        return real(task)

    monkeypatch.setattr(preprocess_module, "process_sample", stop_after_five)
    result = runner.invoke(app, ["preprocess", "--workers", "1", *overrides])
    assert result.exit_code == 1, result.output
    line = (
        rf"17 of {n_ids} samples could not be fetched from {re.escape(flaky_endpoint.url)}: "
        r"[^\n]*EndpointConnectionError[^\n]*; rerun `medctl preprocess` to fetch the rest"
    )
    assert re.search(rf"^error: {line}$", result.output, re.M), result.output
    assert sum(row.startswith("error:") for row in result.output.splitlines()) == 1
    assert len(calls) == 6  # stopped at the first outage: no retries burnt on every remaining sample
    cache = cache_dir_for(load_config(None, overrides, env={}).data)
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert len(manifest) == 5 and (manifest.status == "ok").all()  # what finished is kept
    assert (cache / "data_errors.csv").read_text().strip() == "id,key,stage,error"  # an outage is no bad file
    summary = json.loads((cache / "summary.json").read_text())
    assert len(summary["missing"]) == 17 and re.fullmatch(line, summary["incomplete"])

    finetune = [
        "finetune",
        "-c",
        "config/finetune/linear_probe.toml",
        *overrides,
        'model.encoder="vit3d_test"',
    ]
    refused = runner.invoke(app, [*finetune, f"run.root={json.dumps(str(tmp_path / 'runs'))}"])
    assert refused.exit_code == 1 and re.search(rf"^error: {line}$", refused.output, re.M), refused.output
    allowed = runner.invoke(app, ["preprocess", *overrides, "data.allow_incomplete=true"])
    assert allowed.exit_code == 0 and re.search(line, allowed.output), allowed.output

    flaky_endpoint.restart()
    again = runner.invoke(app, ["preprocess", "--workers", "1", *overrides])
    assert again.exit_code == 0, again.output
    assert "17 new, 5 cached, 0 failed" in again.output
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert len(manifest) == n_ids and manifest["id"].is_unique and (manifest.status == "ok").all()
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["missing"] == [] and summary["incomplete"] == ""
    assert sorted(p.stem for p in (cache / "images").glob("*.npy")) == sorted(manifest["id"])
