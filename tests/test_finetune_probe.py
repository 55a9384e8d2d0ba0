"""The probe on cached embeddings trains the same head as running the frozen encoder every epoch."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medctl.analysis.metrics import target_metrics
from medctl.config import AugmentConfig, load_config
from medctl.data.dataset import split_manifest_hash
from medctl.data.tables import TargetSpec
from medctl.errors import ConfigError
from medctl.finetune import run_finetune
from medctl.finetune.augment import build_augment
from medctl.finetune.features import encoder_fingerprint, feature_key
from medctl.finetune.metrics import epoch_metrics
from medctl.models.preprocessing import data_fingerprint
from medctl.training.state import read_train_state


def probe_config(dataset, tmp_path, name: str, *extra: str):
    return load_config(
        None,
        [
            *dataset.config_overrides(),
            "data.preprocess.workers=1",
            "data.batch_size=4",
            'run.device="cpu"',
            'model.encoder="vit3d_test"',
            "model.head.dropout=0.2",
            "train.epochs=6",
            "train.lr_head=0.01",
            "train.warmup_epochs=1",
            "train.patience=0",
            f"run.root={json.dumps(str(tmp_path))}",
            f"run.name={json.dumps(name)}",
            *extra,
        ],
        env={},
    )


def test_cached_features_train_the_same_head_as_the_frozen_encoder_every_epoch(synthetic_3d, tmp_path):
    cached = run_finetune(probe_config(synthetic_3d, tmp_path, "cached", "train.feature_cache=true"))
    direct = run_finetune(probe_config(synthetic_3d, tmp_path, "direct", "train.feature_cache=false"))
    assert cached.feature_cache and not direct.feature_cache
    assert cached.mode == direct.mode == "linear_probe"

    heads = read_train_state(cached.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    full = read_train_state(direct.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    # the probe's last.ckpt holds the heads only
    assert set(heads) == {k for k in full if k.startswith("heads.")}
    for key, value in heads.items():
        torch.testing.assert_close(value, full[key], atol=1e-4, rtol=1e-3)
    for a, b in zip(cached.history, direct.history, strict=True):  # dropout drew the same masks in both
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    assert cached.best_epoch == direct.best_epoch


def test_a_probe_reads_embeddings_standardised_on_train_and_saves_them_folded_into_a_plain_head(synthetic_3d, tmp_path):
    standardized = run_finetune(probe_config(synthetic_3d, tmp_path, "std"))
    augmented = run_finetune(
        probe_config(synthetic_3d, tmp_path, "aug", "train.augment.enabled=true", "train.augment.noise_std=0.1")
    )
    raw = run_finetune(probe_config(synthetic_3d, tmp_path, "raw", "model.head.standardize=false"))
    finetuned = run_finetune(probe_config(synthetic_3d, tmp_path, "ft", "model.freeze_encoder=false"))
    assert not augmented.feature_cache and finetuned.mode == "finetune"

    train_files = list((standardized.cache_dir / "features").glob("*_train.pt"))
    assert len(train_files) == 1  # one frozen encoder (same seed): the augmented probe read the same cache
    embeddings = torch.load(train_files[0], weights_only=True)["embeddings"]  # (N_train, D)
    for result in (standardized, augmented):
        last = read_train_state(result.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
        mean_key = next(k for k in last if k.endswith("label.mean"))
        torch.testing.assert_close(last[mean_key], embeddings.mean(0))
        torch.testing.assert_close(last[mean_key.replace(".mean", ".std")], embeddings.std(0, unbiased=False), rtol=1e-3, atol=1e-6)
    for result in (raw, finetuned):  # neither reads standardised inputs
        assert not any(k.endswith(".mean") for k in read_train_state(result.run_dir / "checkpoints" / "last.ckpt")["state_dict"])

    folded, plain = (torch.load(r.best_checkpoint, weights_only=True)["state_dict"] for r in (standardized, raw))
    assert {k for k in folded if k.startswith("heads.")} == {"heads.label.fc.weight", "heads.label.fc.bias"}
    assert set(folded) == set(plain)  # the same checkpoint format either way
    assert not torch.allclose(folded["heads.label.fc.weight"], plain["heads.label.fc.weight"])
    assert standardized.history[0]["train_loss"] != raw.history[0]["train_loss"]


def test_feature_key_follows_the_encoder_weights_and_the_data(synthetic_3d, tmp_path):
    config = probe_config(synthetic_3d, tmp_path, "keys")
    result = run_finetune(config)
    base = dict(
        name="vit3d_test", args={"in_channels": 1}, checkpoint="", checkpoint_key="", allow_partial=False
    )
    random_0 = encoder_fingerprint(**base, seed=0)
    assert random_0 != encoder_fingerprint(**base, seed=1)  # random weights: the seed decides them
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    pretrained = encoder_fingerprint(**{**base, "checkpoint": str(ckpt)}, seed=0)
    # a complete load: the seed does not matter
    assert pretrained == encoder_fingerprint(**{**base, "checkpoint": str(ckpt)}, seed=7)
    ckpt.write_bytes(b"xy")  # a new file (size, mtime): a new key
    assert encoder_fingerprint(**{**base, "checkpoint": str(ckpt)}, seed=0) != pretrained
    data = data_fingerprint(result.cache_dir)
    assert data.endswith(split_manifest_hash(result.cache_dir))
    assert feature_key(random_0, data) != feature_key(random_0, data + "x")


def test_augment_builds_monai_transforms_for_2d_and_3d_and_is_seeded_per_epoch():
    settings = AugmentConfig(
        enabled=True,
        flip_axes=[0, 1, 2],
        rotate_degrees=10,
        intensity_jitter=0.1,
        noise_std=0.05,
        blur_sigma=1.0,
        crop_scale=0.75,
        flip_prob=0.5,
        crop_prob=1.0,
    )
    augment = build_augment(settings, [8, 16, 16], seed=0)
    item = {"image": torch.randn(1, 8, 16, 16), "label": torch.tensor(1), "id": "a"}
    out = augment(item)
    assert out["image"].shape == (1, 8, 16, 16) and out["image"].dtype == torch.float32
    assert type(out["image"]) is torch.Tensor and out["label"] is item["label"] and out["id"] == "a"
    assert not torch.equal(out["image"], item["image"])
    augment.set_epoch(3)
    first = augment(item)["image"]
    augment.set_epoch(3)
    torch.testing.assert_close(augment(item)["image"], first)  # same (seed, epoch): same draws
    augment.set_epoch(4)
    assert not torch.equal(augment(item)["image"], first)

    flat = build_augment(settings.model_copy(update={"flip_axes": [0, 1]}), [16, 16], seed=0)
    assert flat({"image": torch.randn(2, 16, 16)})["image"].shape == (2, 16, 16)
    with pytest.raises(ConfigError, match="flip_axes"):
        build_augment(settings, [16, 16], seed=0)  # axis 2 does not exist in 2D
    assert build_augment(settings.model_copy(update={"enabled": False}), [16, 16], seed=0) is None
    assert np.isfinite(out["image"].numpy()).all()


def test_an_interrupted_probe_resumes_to_the_same_head(synthetic_3d, tmp_path, monkeypatch):
    import medctl.finetune.metrics as metrics_module

    full = run_finetune(probe_config(synthetic_3d, tmp_path, "full"))
    original, calls = metrics_module.validation_metrics, []

    def interrupt_at_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill during epoch 2's validation: epochs 0 and 1 are saved
        return original(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "validation_metrics", interrupt_at_epoch_2)
    config = probe_config(synthetic_3d, tmp_path, "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config)
    monkeypatch.setattr(metrics_module, "validation_metrics", original)
    assert read_train_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["epoch"] == 1
    resumed = run_finetune(config, resume=True)

    assert [row["epoch"] for row in resumed.history] == list(range(1, 7))
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    heads = read_train_state(resumed.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in read_train_state(full.run_dir / "checkpoints" / "last.ckpt")["state_dict"].items():
        assert torch.equal(value, heads[key]), key


def test_several_targets_sum_their_weighted_losses_and_average_the_monitored_metric(synthetic_3d, tmp_path):
    table = pd.read_csv(synthetic_3d.table, sep="\t", dtype=str)
    table["site"] = ["north", "south", "east"] * (len(table) // 3) + ["north"] * (len(table) % 3)
    path = tmp_path / "two_targets.tsv"
    table.to_csv(path, sep="\t", index=False)
    targets = (
        '[{name="label", kind="binary", classes=["healthy", "edema"], weight=2.0}, '
        '{name="site", kind="multiclass", classes=["east", "north", "south"], weight=0.5}]'
    )
    result = run_finetune(
        probe_config(
            synthetic_3d, tmp_path, "two", f"data.table={json.dumps(str(path))}", f"data.targets={targets}"
        )
    )
    for row in result.history:
        assert row["train_loss"] == pytest.approx(
            2.0 * row["train_loss_label"] + 0.5 * row["train_loss_site"]
        )
        mean = (row["val_label_balanced_accuracy"] + row["val_site_balanced_accuracy"]) / 2
        assert row["val_balanced_accuracy"] == pytest.approx(mean)
    preds = pd.read_parquet(result.run_dir / "val_preds.parquet")  # one <target>_true / _pred pair per target
    assert list(preds.columns) == [
        "id", "label_true", "label_pred", "label_prob_healthy", "label_prob_edema",
        "site_true", "site_pred", "site_prob_east", "site_prob_north", "site_prob_south",
    ]  # fmt: skip
    assert json.loads((result.run_dir / "class_to_idx.json").read_text())["site"] == {
        "east": 0,
        "north": 1,
        "south": 2,
    }


@pytest.mark.parametrize(("kind", "k"), [("binary", 2), ("multiclass", 3), ("multilabel", 3)])
def test_epoch_metrics_equal_scikit_learns(kind, k):
    rng = np.random.default_rng(0)
    spec = TargetSpec("t", kind, [f"c{i}" for i in range(k)])
    for trial in range(15):
        n = int(rng.integers(3, 14))
        if kind == "multilabel":
            y, probs = rng.integers(0, 2, (n, k)), rng.random((n, k))
        else:  # every third trial leaves the last class out of y_true (undefined AUROC, absent recall)
            y = rng.integers(0, k - 1 if trial % 3 == 0 else k, n)
            probs = rng.random((n, 1)) if kind == "binary" else rng.dirichlet(np.ones(k), n)
        reference = target_metrics(y, probs, spec.classes, kind)  # scikit-learn; None where undefined
        fast = epoch_metrics(y, probs, spec)
        for name, value in fast.items():
            expected = math.nan if reference[name] is None else reference[name]
            assert value == pytest.approx(expected, nan_ok=True), (trial, name)
