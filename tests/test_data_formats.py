"""A new image format is one module defining a ``Format`` plus its line in ``medctl.data.readers.FORMATS``.

The toy format below (a one-line text header, then raw voxels, like a headed ``.raw``) is registered in the
table only, and goes through `medctl preprocess` like any other: located, sized, read, checked against its
declared size, and cached exactly as the same voxels from NRRD are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import medctl.data.readers as readers
from medctl.cli.app import app
from medctl.data.image import DeclaredStorage, Format, Image, ImageHeader, default_direction
from medctl.data.synthetic import make_synthetic_dataset
from medctl.errors import DataError


def write_toy(path: Path, volume: np.ndarray, spacing: Sequence[float]) -> None:
    """``TOY <D> <H> <W> <dtype> <spacing D H W>`` then the voxels, C order."""
    header = f"TOY {' '.join(map(str, volume.shape))} {volume.dtype.name} {' '.join(map(str, spacing))}\n"
    path.write_bytes(header.encode() + np.ascontiguousarray(volume).tobytes())


def _toy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, tuple[float, ...], int]:
    with open(path, "rb") as fh:
        words = fh.readline().decode().split()
        offset = fh.tell()
    if words[:1] != ["TOY"]:
        raise ValueError("no TOY magic")
    return tuple(map(int, words[1:4])), np.dtype(words[4]), tuple(map(float, words[5:8])), offset


def read_toy(paths: Sequence[Path]) -> Image:
    shape, dtype, spacing, offset = _toy_header(paths[0])
    volume = np.fromfile(paths[0], dtype=dtype, offset=offset).reshape(shape)  # (D, H, W)
    return Image(volume[None], spacing, (0.0, 0.0, 0.0), default_direction(3))


def read_toy_header(paths: Sequence[Path]) -> ImageHeader:
    shape, dtype, _, _ = _toy_header(paths[0])
    return ImageHeader(shape, dtype.name)


def toy_storage(path: Path) -> DeclaredStorage:
    shape, dtype, _, offset = _toy_header(path)
    return shape, dtype, "raw", path.stat().st_size - offset


TOY = Format("toy", "toy", (".toy",), read_toy, read_toy_header, declared_storage=toy_storage)


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setitem(readers.FORMATS, TOY.name, TOY)  # the one line a new format adds
    return TOY


def test_a_format_registered_in_the_table_is_preprocessed_like_nrrd(toy_format, tmp_path):
    ds = make_synthetic_dataset(tmp_path / "ds", n=6, size=(8, 16, 16), n_excluded=0, seed=3)
    toy_root = tmp_path / "toy"
    toy_root.mkdir()
    ids = sorted(p.stem for p in ds.image_root.glob("*.nrrd"))
    for id_ in ids:
        image = readers.read_image(ds.image_root / f"{id_}.nrrd")
        write_toy(toy_root / f"{id_}.toy", image.array[0], image.spacing)
    truncated = toy_root / f"{ids[-1]}.toy"
    truncated.write_bytes(truncated.read_bytes()[:-100])  # the header promises more voxels than follow

    assert readers.image_format("a.TOY") == "toy" and readers.read_header(toy_root / f"{ids[0]}.toy").shape == (8, 16, 16)
    with pytest.raises(DataError, match=r"unknown image format '\.raw'; medctl reads .*\.tiff, \.toy"):
        readers.image_format("scan.raw")

    runner = CliRunner()
    common = ["preprocess", "--workers", "1", *ds.config_overrides()]
    from_nrrd = runner.invoke(app, [*common, f"data.cache_dir={json.dumps(str(tmp_path / 'nrrd_cache'))}"])
    from_toy = runner.invoke(
        app,
        [
            *common,
            f"data.cache_dir={json.dumps(str(tmp_path / 'toy_cache'))}",
            f"data.source.root={json.dumps(str(toy_root))}",
            'data.source.pattern="{participant_id}.toy"',
            'data.source.mask_pattern="{participant_id}.nrrd"',
        ],
    )
    assert from_nrrd.exit_code == 0 and from_toy.exit_code == 0, from_toy.output
    assert "6 new, 0 cached, 0 failed" in from_nrrd.output and "5 new, 0 cached, 1 failed" in from_toy.output
    (nrrd_cache,) = (tmp_path / "nrrd_cache").iterdir()
    (toy_cache,) = (tmp_path / "toy_cache").iterdir()
    errors = (toy_cache / "data_errors.csv").read_text()
    assert f"{ids[-1]},{ids[-1]}.toy,read," in errors and "the header declares 8x16x16 int16" in errors
    for id_ in ids[:-1]:
        for kind in ("images", "masks"):
            np.testing.assert_array_equal(np.load(toy_cache / kind / f"{id_}.npy"), np.load(nrrd_cache / kind / f"{id_}.npy"))
