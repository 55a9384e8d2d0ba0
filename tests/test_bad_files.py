"""Broken files say what is wrong with them, through the CLI: scans, checkpoints, training states.

Each case here was found by feeding medctl bad input; each message used to be a library's internal word
(``StopIteration``, "not enough values to unpack", torch's advice to set ``weights_only=False``).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.data.synthetic import make_synthetic_dataset

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def broken(tmp_path):
    """12 synthetic NRRDs (10 kept by the filter), six of them broken in a different way each."""
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, seed=3, cache_dir=tmp_path / "cache")
    root = ds.image_root
    whole = (root / "sub-001.nrrd").read_bytes()
    header_end = whole.index(b"\n\n") + 2
    (root / "sub-003.nrrd").write_bytes(b"")  # 0 bytes
    (root / "sub-004.nrrd").write_bytes(b"NRRD0004\ngarbage line\n\n")  # a magic line, then nonsense
    (root / "sub-006.nrrd").write_bytes(whole[: header_end + (len(whole) - header_end) // 2])  # cut gzip
    (root / "sub-007.nrrd").unlink()
    (root / "sub-007.nrrd").symlink_to(tmp_path / "elsewhere" / "sub-007.nrrd")  # dangling
    (root / "sub-010.nrrd").unlink()
    (root / "sub-010.nrrd").mkdir()  # a folder named like a scan
    (root / "sub-011.nrrd").unlink()  # simply missing
    return ds


def test_preprocess_records_what_is_wrong_with_each_bad_file(broken, tmp_path):
    result = invoke("preprocess", "--workers", "1", *broken.config_overrides())
    assert result.exit_code == 0, result.output
    (cache,) = (tmp_path / "cache").iterdir()
    with open(cache / "data_errors.csv") as fh:
        errors = {row["id"]: row for row in csv.DictReader(fh)}
    assert set(errors) == {"sub-003", "sub-004", "sub-006", "sub-007", "sub-010", "sub-011"}, errors
    assert "empty file (0 bytes)" in errors["sub-003"]["error"]
    assert "corrupt header" in errors["sub-004"]["error"]
    assert "not enough values to unpack" not in errors["sub-004"]["error"]
    truncated = errors["sub-006"]["error"]
    assert "truncated data (got " in truncated and " of 32768 bytes)" in truncated, truncated  # 16*32*32 int16
    assert "multiple of element size" not in truncated
    assert "dangling symlink" in errors["sub-007"]["error"] and "elsewhere" in errors["sub-007"]["error"]
    assert "is a folder, not an image file" in errors["sub-010"]["error"]
    # the key column shows the path that was tried, not the unexpanded pattern
    assert errors["sub-011"]["key"] == "sub-011.nrrd", errors["sub-011"]
    assert "{" not in errors["sub-011"]["key"] and "StopIteration" not in json.dumps(errors)


def test_check_data_lists_every_unreadable_file(broken):
    result = invoke("check", "data", *broken.config_overrides())
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "✗ readable: 2 unreadable" in text, result.output  # headers only: the cut gzip data is not read
    for id_, what in (("sub-003", "empty file"), ("sub-004", "corrupt header")):
        assert f"{id_}: " in text and what in text, (id_, result.output)
    assert "StopIteration" not in text


def test_empty_splits_row_says_how_to_fix_it(tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=12, seed=3, cache_dir=tmp_path / "cache")
    table = pd.read_csv(ds.table, sep="\t", dtype=str)
    table["recommended_split"] = table["recommended_split"].replace("val", "train")
    path = tmp_path / "no_val.tsv"
    table.to_csv(path, sep="\t", index=False)
    result = invoke("check", "data", *ds.config_overrides(), f"data.table={json.dumps(str(path))}")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "✗ empty splits: no sample in split(s) val" in text
    assert "mark some rows 'val' in the `recommended_split` column" in text, result.output


# ------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def pretrained_run(synthetic_3d, tiny_byol, tmp_path_factory):
    """One finished 1-epoch BYOL run to break the checkpoints of."""
    root = tmp_path_factory.mktemp("bad_ckpt")
    args = [
        *synthetic_3d.config_overrides(), *tiny_byol, f"run.root={json.dumps(str(root / 'runs'))}", 'run.name="run"',
        "pretrain.epochs=1", "pretrain.knn_every=0", "pretrain.monitor_every=0",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDCTL_NO_PROGRESS", "1")
        result = invoke("pretrain", *args)
    assert result.exit_code == 0, result.output
    return root, args


def test_an_empty_checkpoint_file_says_empty(synthetic_3d, tmp_path):
    empty = tmp_path / "encoder.ckpt"
    empty.write_bytes(b"")
    result = invoke(
        "check", "checkpoint", *synthetic_3d.config_overrides(), 'model.encoder="vit3d_test"',
        "--ckpt", str(empty),
    )  # fmt: skip
    text = one_error_line(result)
    assert "empty file (0 bytes)" in text, result.output


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", ["hostile", "empty"])
def test_a_bad_last_ckpt_on_resume_is_one_clean_line(pretrained_run, damage, tmp_path):
    root, args = pretrained_run
    run_dir = Path(root) / "runs" / "run"
    copy = tmp_path / "runs" / "run"
    shutil.copytree(run_dir, copy)
    last = copy / "checkpoints" / "last.ckpt"
    if damage == "hostile":
        torch.save({"medctl": {"kind": "train_state", "format": 1}, "x": Hostile()}, last, pickle_module=pickle)
    else:
        last.write_bytes(b"")
    moved = [a.replace(str(root), str(tmp_path)) for a in args]
    result = invoke("pretrain", *moved, "--resume")
    text = one_error_line(result)
    assert str(last) in text and "weights_only=False" not in text and "pwned" not in result.output
    if damage == "hostile":
        assert "refused" in text and "pickled Python objects" in text and "system" in text
    else:
        assert "empty file (0 bytes)" in text
