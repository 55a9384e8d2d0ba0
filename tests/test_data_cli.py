"""`medctl preprocess`, `medctl check data`, `medctl check bucket` through the CLI, on synthetic data."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

import medctl.data.modality as modality_module
from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def dataset(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, seed=3, cache_dir=tmp_path / "cache")
    return ds


def test_preprocess_command_builds_the_cache_and_a_rerun_decodes_nothing(dataset, tmp_path, monkeypatch):
    result = invoke("preprocess", "--workers", "1", *dataset.config_overrides())
    assert result.exit_code == 0, result.output
    (cache,) = (tmp_path / "cache").iterdir()
    assert f"cache {cache}" in result.output and "10 new, 0 cached, 0 failed" in result.output
    assert "label: class counts per split" in result.output and "healthy" in result.output
    manifest = pd.read_parquet(cache / "manifest.parquet")
    assert {"id", "source_key", "fingerprint", "split", "status", "shape", "spacing", "origin", "direction",
            "orig_shape", "has_mask", "label"} <= set(manifest.columns)  # fmt: skip
    assert len(list((cache / "images").glob("*.npy"))) == 10 == len(list((cache / "masks").glob("*.npy")))
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["counts"]["total"] == 10 and summary["spatial_size"] == [16, 32, 32]
    assert sum(summary["counts"]["splits"].values()) == 10

    monkeypatch.setattr(
        modality_module, "read_image", lambda paths: pytest.fail(f"decoded {paths} on a rerun")
    )
    again = invoke("preprocess", "--workers", "1", *dataset.config_overrides())
    assert again.exit_code == 0 and "0 new, 10 cached, 0 failed" in again.output


def test_bad_tables_are_one_line_errors_with_exit_2(dataset, tmp_path):
    table = pd.read_csv(dataset.table, sep="\t", dtype=str)
    cases = {
        "empty": (table.iloc[:0], "the table has no rows"),
        "unknown": (
            table.assign(label=table.label.replace("edema", "oedema")),
            "unknown class value 'oedema'",
        ),
        "duplicate": (pd.concat([table, table.iloc[:1]]), "duplicate ids in participant_id: sub-001 (x2)"),
    }
    for name, (frame, expected) in cases.items():
        path = tmp_path / f"{name}.tsv"
        frame.to_csv(path, sep="\t", index=False)
        result = invoke("preprocess", *dataset.config_overrides(), f"data.table={json.dumps(str(path))}")
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.output


def test_check_data_reports_counts_and_every_problem(dataset, tmp_path):
    ok = invoke("check", "data", *dataset.config_overrides(), 'data.group_column="subject_id"')
    assert ok.exit_code == 0, ok.output
    for row in ("✓ table", "✓ columns", "✓ filter: 10 of 12 rows kept", "✓ ids: 10 unique ids", "✓ target label",
                "✓ leakage: no subject spans two splits", "✓ files: 10 ids matched", "✓ readable"):  # fmt: skip
        assert row in ok.output, ok.output
    assert "samples per split" in ok.output

    table = pd.read_csv(dataset.table, sep="\t", dtype=str)
    table.loc[0, "recommended_split"] = "test" if table.loc[1, "recommended_split"] != "test" else "train"
    table.loc[2, "label"] = "unknown-grade"
    (dataset.image_root / "sub-005.nrrd").unlink()
    (dataset.image_root / "sub-006.nrrd").write_bytes(b"not an nrrd at all")
    bad = tmp_path / "bad.tsv"
    table.to_csv(bad, sep="\t", index=False)
    result = invoke("check", "data", *dataset.config_overrides(), f"data.table={json.dumps(str(bad))}",
                    'data.group_column="subject_id"')  # fmt: skip
    assert result.exit_code == 2
    assert "✗ target label: unknown class value 'unknown-grade'" in result.output
    assert "✗ files: 1 missing, 0 ambiguous of 10 ids (e.g. sub-005: no key matches pattern" in result.output
    assert "✗ readable: 1 unreadable (9 of 9 headers read):" in result.output and "    sub-006: " in result.output


def test_check_data_finds_leakage_and_empty_splits(dataset, tmp_path):
    table = pd.read_csv(dataset.table, sep="\t", dtype=str)
    table["recommended_split"] = "train"
    table.loc[3, "recommended_split"] = "test"  # sub-004 shares subj-002 with sub-003 (train)
    path = tmp_path / "leaky.tsv"
    table.to_csv(path, sep="\t", index=False)
    result = invoke("check", "data", *dataset.config_overrides(), f"data.table={json.dumps(str(path))}",
                    'data.group_column="subject_id"')  # fmt: skip
    assert result.exit_code == 2
    assert "✗ empty splits: no sample in split(s) val" in result.output
    assert "✗ leakage: 1 subject(s) span splits (subj-002 in test+train)" in result.output


def test_check_bucket_on_a_local_folder(dataset):
    result = invoke("check", "bucket", "--ids", "2", *dataset.config_overrides())
    assert result.exit_code == 0, result.output
    assert "✓ endpoint: local folder" in result.output and "✓ keys: 2/2 ids matched" in result.output
    assert "✓ read: sub-001: shape (C=1, D=16, H=32, W=32), spacing (D 2, H 1, W 1) mm, dtype int16" in result.output
