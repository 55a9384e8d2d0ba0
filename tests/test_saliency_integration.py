"""Saliency on the real pieces: a registry encoder, the preprocessed cache and its manifest geometry.

This is what ``medctl saliency`` will do: preprocess synthetic NRRDs (resized, so the cached grid differs
from the source), read the test split with masks, and explain a classifier built from the registry;
the maps written back must sit on the source scans' grids.
"""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pandas as pd
import pytest
import torch

from medctl.config import SaliencyConfig, load_config
from medctl.data.dataset import CacheDataset, target_specs
from medctl.data.preprocess import preprocess
from medctl.data.readers import read_image
from medctl.models.classifier import build_classifier
from medctl.models.registry import build_encoder
from medctl.saliency import cache_geometry, resample_to_grid, run_saliency, source_geometry

SIZE = [8, 16, 16]  # the synthetic volumes are (16, 32, 32): the cache is a resized copy


@pytest.fixture(scope="module")
def cache(synthetic_3d, tmp_path_factory):
    overrides = [
        *synthetic_3d.config_overrides(),
        f"data.cache_dir={json.dumps(str(tmp_path_factory.mktemp('saliency_cache')))}",
        f"data.preprocess.spatial_size={json.dumps(SIZE)}",
    ]
    return preprocess(load_config(None, overrides, env={}).data, workers=1).cache_dir


def samples_with_geometry(cache, split: str, n: int) -> list[dict]:
    dataset = CacheDataset(cache, split, with_mask=True)
    samples = []
    for i in range(min(n, len(dataset))):
        item = dict(dataset[i])
        item["geometry"] = dataset.manifest.iloc[i].to_dict()
        samples.append(item)
    return samples


def test_cached_images_map_back_onto_their_source_scans(synthetic_3d, cache):
    """The cache's recorded geometry puts a cached image back where the source image is."""
    manifest = pd.read_parquet(cache / "manifest.parquet")
    row = manifest[manifest.status == "ok"].iloc[0]
    cached = np.load(cache / "images" / f"{row['id']}.npy")[0]  # (D, H, W)
    source = source_geometry(row, 3)
    grid = cache_geometry(row, cached.shape, source)
    back = resample_to_grid(cached, grid, source)
    original = read_image(synthetic_3d.image_root / synthetic_3d.pattern.format(participant_id=row["id"]))
    assert back.shape == original.array.shape[1:] == source.shape
    np.testing.assert_allclose(source.spacing, original.spacing)
    correlation = np.corrcoef(back.ravel(), original.array[0].astype(np.float64).ravel())[0, 1]
    assert correlation > 0.9  # the same anatomy in the same place (smoothed by the 2x downsampling)


def test_run_saliency_on_a_registry_encoder_and_the_cache(synthetic_3d, cache, tmp_path, seed):
    (spec,) = target_specs(cache)
    encoder = build_encoder("resnet_test_3d", in_channels=1, input_size=SIZE)
    classifier = build_classifier(encoder, [spec])
    samples = samples_with_geometry(cache, "test", 1)

    result = run_saliency(
        classifier,
        samples,
        classes=spec.classes,
        target_name=spec.name,
        out_dir=tmp_path,
        settings=SaliencyConfig(methods=["integrated_gradients", "gradcam"], ig_steps=4, randomisation_check=True),
    )

    index = result.index
    assert len(index) == 2 * len(samples)
    assert index["mask_share"].notna().all()  # the synthetic masks came through the cache
    assert index["randomisation_spearman"].notna().any()
    assert any(name.startswith("encoder.layer4") for name in result.randomised_modules)  # full re-initialisation
    assert any(name.startswith("encoder.conv1") for name in result.randomised_modules)
    for _, row in index.iterrows():
        original = read_image(tmp_path / row["map_original_nrrd"])
        source = read_image(synthetic_3d.image_root / synthetic_3d.pattern.format(participant_id=row["id"]))
        assert original.array.shape[1:] == source.array.shape[1:]
        np.testing.assert_allclose(original.spacing, source.spacing)
        np.testing.assert_allclose(original.origin, source.origin)
        np.testing.assert_allclose(original.direction, source.direction)
        cached = read_image(tmp_path / row["map_nrrd"])
        assert cached.array.shape[1:] == tuple(SIZE)
        np.testing.assert_allclose(
            cached.spacing, np.asarray(source.spacing) * np.asarray(source.array.shape[1:]) / SIZE
        )
        assert np.isfinite(original.array).all()


def test_a_token_encoder_from_the_registry(cache, tmp_path, seed):
    (spec,) = target_specs(cache)
    encoder = build_encoder("vit3d_test", in_channels=1, input_size=SIZE)
    classifier = build_classifier(encoder, [spec])
    samples = samples_with_geometry(cache, "test", 1)
    result = run_saliency(
        classifier,
        samples,
        classes=spec.classes,
        target_name=spec.name,
        out_dir=tmp_path,
        settings=SaliencyConfig(methods=["gradcam"], ig_steps=4, randomisation_check=True, deletion=False),
    )
    assert any(name.startswith("encoder.blocks.") for name in result.randomised_modules)
    with torch.no_grad():
        assert np.isfinite(result.index["target_probability"]).all()


def preprocess_with(dataset, tmp_path_factory, *extra: str):
    overrides = [
        *dataset.config_overrides(),
        f"data.cache_dir={json.dumps(str(tmp_path_factory.mktemp('saliency_cache')))}",
        *extra,
    ]
    return preprocess(load_config(None, overrides, env={}).data, workers=1).cache_dir


@pytest.mark.parametrize("case", ["png", "slices"])
def test_two_dimensional_maps_from_pngs_and_from_slices(
    case, synthetic_2d, synthetic_3d, tmp_path_factory, seed
):
    if case == "png":  # 2D images: the map goes back onto the PNG's grid
        cache = preprocess_with(synthetic_2d, tmp_path_factory, "data.preprocess.spatial_size=[16, 16]")
    else:  # axial slices cut from volumes: each map is placed on its slice in the volume's world
        cache = preprocess_with(
            synthetic_3d,
            tmp_path_factory,
            'data.preprocess.slices="axial"',
            "data.preprocess.spatial_size=[16, 16]",
        )
    (spec,) = target_specs(cache)
    classifier = build_classifier(build_encoder("resnet_test_2d", in_channels=1, input_size=[16, 16]), [spec])
    out = tmp_path_factory.mktemp("saliency_out")
    result = run_saliency(
        classifier,
        samples_with_geometry(cache, "test", 1),
        classes=spec.classes,
        target_name=spec.name,
        out_dir=out,
        settings=SaliencyConfig(methods=["gradients"], ig_steps=4, randomisation_check=False, deletion=False),
    )
    row = result.index.iloc[0]
    header = nrrd.read_header(str(out / row["map_nrrd"]))
    if case == "png":
        assert int(header["space dimension"]) == 2
        original = read_image(out / row["map_original_nrrd"])
        assert original.array.shape[1:] == (32, 32)  # the synthetic PNGs' size
        np.testing.assert_allclose(original.spacing, (1.0, 1.0))
    else:
        assert header["space"] == "left-posterior-superior"  # a 2D grid in 3D world space
        assert np.asarray(header["space directions"]).shape == (2, 3)
        assert pd.isna(row["map_original_nrrd"])  # a slice has no 2D source grid of its own
