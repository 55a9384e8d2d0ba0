"""``run_saliency`` end to end on tiny models: files, index, scores, class means, and bad input."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medctl.config import SaliencyConfig
from medctl.data.readers import read_image
from medctl.errors import ConfigError, DataError, UserError
from medctl.saliency import run_saliency
from saliency_support import ball, make_model

SIZE = (8, 16, 16)
FAST = dict(ig_steps=8, occlusion_window=[4, 8, 8], occlusion_stride=[4, 8, 8], target="pred", deletion=False)


def settings(methods: list[str], **values) -> SaliencyConfig:
    return SaliencyConfig(methods=methods, **{**FAST, **values})


def volume_samples(n: int = 3, *, with_geometry: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        mask = ball(SIZE, (4, 4 + 3 * i, 8), 2.0)
        image = rng.normal(size=(1, *SIZE)).astype(np.float32)  # (C, D, H, W)
        image[0][mask] += 2.0
        sample = {"image": torch.from_numpy(image), "id": f"sub/{i:02d}", "label": torch.tensor(i % 3)}
        sample["mask"] = torch.from_numpy(mask[None].astype(np.float32))  # (1, D, H, W)
        if with_geometry:
            sample["geometry"] = {
                "spacing": [3.0, 0.8, 0.8],
                "origin": [-5.0, 12.0, 7.5],
                "direction": [[1, 0, 0], [0, 1, 0], [0, 0, -1]],
                "orig_shape": [20, 40, 48],
            }
        samples.append(sample)
    return samples


def test_three_dimensional_run_writes_maps_panels_index_and_scores(tmp_path, seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZE)
    result = run_saliency(
        model,
        volume_samples(),
        classes=["low", "mid", "high"],
        target_name="grade",
        out_dir=tmp_path,
        settings=settings(["integrated_gradients", "gradcam"], randomisation_check=True, deletion=True, deletion_steps=4),
    )

    index = pd.read_csv(result.index_path)
    assert len(index) == 6 and set(index["method"]) == {"integrated_gradients", "gradcam"}
    assert index["label"].tolist()[:2] == ["low", "low"] and index["label"].tolist()[-1] == "high"
    assert index["prediction"].isin(["low", "mid", "high"]).all()
    assert (index["target_class"] == index["prediction"]).all()  # target = "pred"
    assert index["probability"].between(0, 1).all()
    assert index["pointing_hit"].notna().all() and index["mask_share"].between(0, 0.2).all()
    assert index["randomisation_spearman"].between(-1, 1).all()
    assert result.randomised_modules and "heads.grade" in result.randomised_modules
    # a deletion curve per lesion sample and map, beside random order and the random-weight map's order
    for column in ("deletion_auc", "deletion_random_order_auc", "deletion_random_weights_auc"):
        assert index[column].between(0, 1).all()
    assert result.scores["gradcam"]["deletion"]["n"] == 3 and "deletion AUC" in result.scores["gradcam"]["verdict"]
    assert index["misclassified"].tolist() == (index["prediction"] != index["label"]).tolist()
    assert set(index.loc[index["method"] == "gradcam", "layer"]) == {result.cam_layers["gradcam"].name}

    row = index.iloc[0]
    cached = read_image(tmp_path / row["map_nrrd"])  # (1, D, H, W) with LPS geometry
    assert cached.array.shape == (1, *SIZE) and np.isfinite(cached.array).all()
    np.testing.assert_allclose(cached.spacing, [3.0 * 20 / 8, 0.8 * 40 / 16, 0.8 * 48 / 16])
    assert nrrd.read_header(str(tmp_path / row["map_nrrd"]))["space"] == "left-posterior-superior"

    original = read_image(tmp_path / row["map_original_nrrd"])
    assert original.array.shape == (1, 20, 40, 48)
    np.testing.assert_allclose(original.origin, [-5.0, 12.0, 7.5])
    np.testing.assert_allclose(original.spacing, [3.0, 0.8, 0.8])
    np.testing.assert_allclose(original.direction, np.diag([1.0, 1.0, -1.0]))

    panel = np.asarray(Image.open(tmp_path / row["panel_png"]).convert("L"), dtype=float)
    assert panel.std() > 10
    assert (tmp_path / "maps" / "sub_00" / "image.nrrd").is_file()

    saved = json.loads(result.scores_path.read_text())
    assert saved["kind"] == "multiclass" and saved["methods"] == ["integrated_gradients", "gradcam"]
    assert saved["scores"]["gradcam"]["n"] == 3
    assert saved["scores"]["gradcam"]["pointing_hit_rate"] == pytest.approx(
        result.scores["gradcam"]["pointing_hit_rate"]
    )

    explained = index.groupby(["method", "target_class"]).size()
    assert len(result.class_means) == len(explained)
    for entry in result.class_means:
        assert entry["n"] == explained[(entry["method"], entry["class"])]
        mean_map, header = nrrd.read(str(tmp_path / entry["nrrd"]), index_order="C")
        assert mean_map.shape == SIZE and np.abs(mean_map).max() <= 1.0 + 1e-6  # mean of max-normalised maps
        assert "space directions" in header  # all samples share the grid, so the mean keeps it
        assert (tmp_path / entry["png"]).is_file()


def test_two_dimensional_binary_run_with_true_targets_and_dataset_items(tmp_path, seed):
    model = make_model("tokens", 2, {"edema": 1}, (16, 16))
    rng = np.random.default_rng(1)
    # CacheDataset items carry the label under the target's name
    samples = [
        {
            "image": torch.from_numpy(rng.normal(size=(1, 16, 16)).astype(np.float32)),
            "id": f"s{i}",
            "edema": torch.tensor(i),
        }
        for i in range(2)
    ]
    result = run_saliency(
        model,
        samples,
        classes=["no", "yes"],
        target_name="edema",
        out_dir=tmp_path,
        settings=settings(["occlusion"], target="true", randomisation_check=False),
    )
    index = result.index
    assert index["target_class"].tolist() == ["no", "yes"]
    assert index["label"].tolist() == ["no", "yes"]
    positive = index["probability"].where(index["prediction"] == "yes", 1 - index["probability"])
    assert np.allclose(
        index["target_probability"], np.where(index["target_class"] == "yes", positive, 1 - positive)
    )
    assert index["map_original_nrrd"].isna().all() and index["pointing_hit"].isna().all()
    data, header = nrrd.read(str(tmp_path / index["map_nrrd"][0]), index_order="C")
    assert data.shape == (16, 16) and "space directions" not in header
    assert json.loads(result.scores_path.read_text())["kind"] == "binary"


def test_a_named_class_and_a_multilabel_target(tmp_path, seed):
    model = make_model("cnn", 3, {"findings": 3}, SIZE)
    samples = volume_samples(1, with_geometry=False)
    samples[0]["label"] = torch.tensor([0.0, 1.0, 1.0])
    result = run_saliency(
        model,
        samples,
        classes=["a", "b", "c"],
        target_name="findings",
        kind="multilabel",
        out_dir=tmp_path,
        settings=settings(["gradients"], target="c", randomisation_check=False),
    )
    row = result.index.iloc[0]
    assert row["target_class"] == "c" and row["label"] == "b;c"
    with torch.no_grad():
        expected = torch.sigmoid(model(samples[0]["image"][None])["findings"][0, 2]).item()
    assert row["target_probability"] == pytest.approx(expected, rel=1e-5)


def run(tmp_path, model, samples, methods=("gradients",), target="pred", **overrides):
    arguments = dict(classes=["low", "mid", "high"], target_name="grade", out_dir=tmp_path)
    arguments.update(overrides)
    chosen = settings(list(methods), target=target, randomisation_check=False)
    return run_saliency(model, samples, settings=chosen, **arguments)


def test_bad_input_fails_with_one_clear_line(tmp_path, seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZE)
    samples = volume_samples(1, with_geometry=False)
    with pytest.raises(ConfigError, match="saliency.methods.*'lrp'"):
        run(tmp_path, model, samples, methods=["lrp"])
    with pytest.raises(ConfigError, match="saliency.target.*low, mid, high"):
        run(tmp_path, model, samples, target="severe")
    with pytest.raises(UserError, match="head gives 3 logits but 2 classes"):
        run(tmp_path, model, samples, classes=["low", "high"])
    with pytest.raises(UserError, match="no head `stage`"):
        run(tmp_path, model, samples, target_name="stage")
    unlabelled = [{"image": samples[0]["image"], "id": "u1"}]
    with pytest.raises(DataError, match="sample u1 has no label.*pred"):
        run(tmp_path, model, unlabelled, target="true")
    with pytest.raises(DataError, match="sample u1: image has shape"):
        run(tmp_path, model, [{"image": torch.zeros(8, 16, 16), "id": "u1"}])
    bad_mask = [{"image": samples[0]["image"], "id": "m1", "mask": torch.zeros(1, 4, 4, 4)}]
    with pytest.raises(DataError, match="sample m1: mask shape"):
        run(tmp_path, model, bad_mask)
    with pytest.raises(DataError, match="need `image` and `id`"):
        run(tmp_path, model, [{"img": samples[0]["image"]}])
    with pytest.raises(DataError, match="no samples"):
        run(tmp_path, model, [])
