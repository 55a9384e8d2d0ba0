"""Checkpoints: V-JEPA 2 training files load strictly and reproduce features; unsafe, truncated and partial
files are refused with clear messages; stems and position tables adapt; medctl's format round-trips."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from medctl.errors import CheckpointError
from medctl.models.checkpoints import (
    classifier_payload,
    encoder_payload,
    load_classifier,
    load_encoder_weights,
    read_checkpoint,
    save_checkpoint,
)
from medctl.models.classifier import build_classifier
from medctl.models.encoders.vit3d import resize_pos_embed
from medctl.models.registry import build_encoder

SIZE = (8, 16, 16)


def vit(seed: int, size=SIZE, **kwargs):
    torch.manual_seed(seed)
    return build_encoder("vit3d_test", input_size=size, **kwargs).eval()


def write_vjepa2_checkpoint(path: Path, encoder, target_encoder) -> Path:
    """V-JEPA 2's app/vjepa/train.py layout: DDP(MultiSeqWrapper(vit)) -> keys under `module.backbone.`."""

    def wrapped(module):
        return {f"module.backbone.{k}": v.clone() for k, v in module.state_dict().items()}

    predictor = {"module.backbone.predictor_embed.weight": torch.randn(32, 64), "module.backbone.mask_tokens.0": torch.zeros(1, 1, 32)}
    torch.save(
        {
            "encoder": wrapped(encoder),
            "predictor": predictor,
            "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "scaler": None,
            "target_encoder": wrapped(target_encoder),
            "epoch": 12,
            "loss": 0.42,
            "batch_size": 4,
            "world_size": 8,
            "lr": 1e-4,
        },
        path,
    )
    return path


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_vjepa2_training_checkpoint_loads_strictly_and_reproduces_features(tmp_path, pos_embed):
    online, target = vit(1, pos_embed=pos_embed), vit(2, pos_embed=pos_embed)
    path = write_vjepa2_checkpoint(tmp_path / "vjepa2.pt", online, target)
    x = torch.randn(2, 1, *SIZE)

    fresh = vit(3, pos_embed=pos_embed)
    report = load_encoder_weights(fresh, path)  # default entry: target_encoder

    assert report.complete and report.loaded_share == 1.0
    assert report.source_key == "target_encoder" and report.prefix == "module.backbone."
    assert "V-JEPA" in report.format and "DDP" in report.format
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    with torch.no_grad():
        assert torch.equal(fresh.forward_features(x), target.forward_features(x))

    other = vit(4, pos_embed=pos_embed)
    assert load_encoder_weights(other, path, key="encoder").source_key == "encoder"
    with torch.no_grad():
        assert torch.equal(other.forward_features(x), online.forward_features(x))


def test_sincos_table_into_a_rope_model_is_dropped_with_a_note(tmp_path):
    """pos_embed = "rope" says the file is a RoPE model that saved an unused table (V-JEPA 2's releases):
    the table is dropped with a note, with no refusal and no allow_partial_load."""
    source = vit(1)
    path = write_vjepa2_checkpoint(tmp_path / "vjepa2.pt", source, source)
    report = load_encoder_weights(vit(2, pos_embed="rope"), path)
    assert report.complete and report.unexpected == [] and report.loaded_share == 1.0
    assert any("sin-cos table for the grid [4, 2, 2] dropped" in note for note in report.notes)


def test_learned_table_into_a_rope_model_is_refused(tmp_path):
    source = vit(1)
    source.pos_embed.normal_()  # learned positions, no sin-cos table: dropping them would lose them
    path = write_vjepa2_checkpoint(tmp_path / "vjepa2.pt", source, source)
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(vit(2, pos_embed="rope"), path)
    message = str(info.value)
    assert "vjepa2.pt: refused" in message and "learned pos_embed" in message
    assert 'pos_embed = "sincos"' in message and "model.allow_partial_load = true" in message


def test_positions_are_matched_by_grid_not_by_count(tmp_path):
    source = vit(1, size=(16, 32, 32))  # grid (8, 4, 4): 128 positions
    path = write_vjepa2_checkpoint(tmp_path / "vjepa2.pt", source, source)
    column = vit(2, size=(64, 32, 8))  # grid (32, 4, 1): also 128 positions
    assert column.pos_embed.shape == source.pos_embed.shape
    report = load_encoder_weights(column, path)
    assert report.complete and any("from grid [8, 4, 4] to [32, 4, 1]" in note for note in report.notes)
    torch.testing.assert_close(column.pos_embed, resize_pos_embed(source.pos_embed, (8, 4, 4), (32, 4, 1)))
    assert not torch.allclose(column.pos_embed, source.pos_embed)  # the count alone would have kept it as is
    x = torch.randn(1, 1, 64, 32, 8)
    with torch.no_grad():  # the source model interpolates its own table to the same grid at run time
        torch.testing.assert_close(column(x), source(x))


def test_sincos_model_refuses_a_rope_checkpoint_with_a_hint(tmp_path):
    path = write_vjepa2_checkpoint(tmp_path / "rope.pt", vit(1, pos_embed="rope"), vit(1, pos_embed="rope"))
    with pytest.raises(CheckpointError, match='pos_embed = "rope"'):
        load_encoder_weights(vit(2), path)


def test_pos_embed_is_resized_to_a_new_grid_like_vjepa2_would(tmp_path):
    source = vit(1)  # grid (4, 2, 2)
    path = write_vjepa2_checkpoint(tmp_path / "vjepa2.pt", source, source)
    bigger = vit(2, size=(16, 32, 48))  # grid (8, 4, 6)
    report = load_encoder_weights(bigger, path)
    assert report.complete
    assert any("from grid [4, 2, 2] to [8, 4, 6]" in note for note in report.notes)
    torch.testing.assert_close(bigger.pos_embed, resize_pos_embed(source.pos_embed, (4, 2, 2), (8, 4, 6)))
    x = torch.randn(1, 1, 16, 32, 48)
    with torch.no_grad():  # the source model interpolates at run time to the same table
        torch.testing.assert_close(bigger(x), source(x))


def test_three_channel_stem_is_summed_to_one_channel(tmp_path):
    rgb = vit(1, in_channels=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    gray = vit(2)
    report = load_encoder_weights(gray, tmp_path / "rgb.pt")
    assert report.complete and report.format == "bare state dict"
    assert any("patch_embed.proj.weight: 3 input channels summed into 1" in note for note in report.notes)
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():  # a grey volume given to the RGB model three times is the same computation
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1, -1)), atol=1e-5, rtol=1e-5)


def test_partial_load_is_refused_unless_allowed(tmp_path):
    state = {k: v for k, v in vit(1).state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(vit(2), tmp_path / "partial.pt")
    message = str(info.value)
    assert "partial.pt" in message and "model.allow_partial_load = true" in message
    assert "% of the encoder)" in message and "12 missing" in message and "100%" not in message

    report = load_encoder_weights(vit(2), tmp_path / "partial.pt", allow_partial=True)
    assert not report.complete and len(report.missing) == 12 and 0.3 < report.loaded_share < 0.9


def test_mis_shaped_and_unrelated_checkpoints_are_refused(tmp_path):
    torch.save(build_encoder("vit3d_test", input_size=SIZE, embed_dim=32).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_encoder_weights(vit(1), tmp_path / "narrow.pt")
    torch.save({"conv.weight": torch.randn(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="none of the encoder's weights"):
        load_encoder_weights(vit(1), tmp_path / "other.pt", allow_partial=True)


class RunsCode:
    """Unpickling this creates a directory: code a checkpoint must never get to run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": vit(1).state_dict(), "hook": RunsCode(str(marker))}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as fh:  # a plain pickle too
        pickle.dump({"hook": RunsCode(str(marker))}, fh)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(CheckpointError) as info:
            load_encoder_weights(vit(2), tmp_path / name)
        message = str(info.value)
        assert name in message and "refused" in message and "could run code" in message
        assert "weights_only=True" in message and "makedirs" in message  # names the offending global
    assert not marker.exists()


def test_truncated_or_empty_checkpoint_is_corrupt_or_incomplete(tmp_path):
    torch.save(vit(1).state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    for name, content in (("half.pt", data[: len(data) // 2]), ("head.pt", data[:200])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}: corrupt or incomplete"):
            read_checkpoint(tmp_path / name)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt: empty file \(0 bytes\)"):
        read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_lightning_ddp_and_key_selection(tmp_path):
    source = vit(1)
    lightning = {
        "state_dict": {**{f"model.encoder.{k}": v for k, v in source.state_dict().items()}, "model.head.weight": torch.randn(2, 64)},
        "pytorch-lightning_version": "2.2.0",
        "optimizer_states": [],
        "epoch": 3,
    }
    torch.save(lightning, tmp_path / "lightning.ckpt")
    report = load_encoder_weights(vit(2), tmp_path / "lightning.ckpt")
    assert report.complete and report.format.startswith("Lightning") and report.prefix == "model.encoder."
    assert report.ignored == ["model.head.weight"]

    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    report = load_encoder_weights(vit(2), tmp_path / "ddp.pt")
    assert report.complete and report.prefix == "module." and "DDP" in report.format

    with pytest.raises(CheckpointError, match="no `teacher` entry.*lightning|it has: state_dict"):
        load_encoder_weights(vit(2), tmp_path / "lightning.ckpt", key="teacher")


def test_numpy_scalars_in_a_checkpoint_are_data_not_code(tmp_path):
    torch.save({"model": vit(1).state_dict(), "loss": np.float64(0.5), "epoch": np.int64(7)}, tmp_path / "np.pt")
    ckpt = read_checkpoint(tmp_path / "np.pt")
    assert float(ckpt["loss"]) == 0.5
    assert load_encoder_weights(vit(2), tmp_path / "np.pt").source_key == "model"


def test_medctl_encoder_checkpoint_round_trips(tmp_path):
    source = vit(1, pos_embed="rope")
    payload = encoder_payload(source, name="vit3d_test", args=source.build_args, config_text="[model]\n", metrics={"loss": np.float32(0.25)})
    path = save_checkpoint(tmp_path / "ckpts" / "encoder.ckpt", payload)
    assert sorted(p.name for p in path.parent.iterdir()) == ["encoder.ckpt"]  # no temp file left

    ckpt = torch.load(path, weights_only=True)
    assert ckpt["medctl"]["kind"] == "encoder" and ckpt["model"]["args"]["pos_embed"] == "rope"
    assert ckpt["metrics"] == {"loss": 0.25}
    fresh = vit(2, pos_embed="rope")
    report = load_encoder_weights(fresh, path, key="target_encoder")  # the key is moot for medctl files
    assert report.complete and report.format.startswith("medctl encoder")
    x = torch.randn(1, 1, *SIZE)
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))


def test_save_refuses_objects_weights_only_cannot_read_back(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['metrics'\]\['when'\] is a object"):
        save_checkpoint(tmp_path / "bad.ckpt", {"metrics": {"when": object()}})
    assert list(tmp_path.iterdir()) == []


TARGETS = [
    {"name": "edema", "kind": "binary", "classes": ["no", "yes"]},
    {"name": "stage", "kind": "multiclass", "classes": ["a", "b", "c"]},
]


@pytest.mark.parametrize("head", ["linear", "attentive"])
def test_classifier_checkpoint_is_self_contained(tmp_path, head):
    classifier = build_classifier(vit(1), TARGETS, kind=head, dropout=0.1).eval()
    info = {"name": "vit3d_test", "args": classifier.encoder.build_args, "head": {"kind": head, "hidden": 0, "dropout": 0.1}}
    payload = classifier_payload(
        classifier, model_info=info, targets=TARGETS, preprocessing={"spatial_size": list(SIZE), "intensity": "zscore"}, config_text="x = 1\n"
    )
    path = save_checkpoint(tmp_path / "best.ckpt", payload)

    loaded, meta = load_classifier(path)
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():
        expected, got = classifier(x), loaded(x)
    assert got["edema"].shape == (2, 1) and got["stage"].shape == (2, 3)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert meta["targets"] == TARGETS and meta["preprocessing"]["intensity"] == "zscore" and meta["config"] == "x = 1\n"

    encoder = vit(5)
    report = load_encoder_weights(encoder, path)
    assert report.complete and report.prefix == "encoder." and all(k.startswith("heads.") for k in report.ignored)

    save_checkpoint(tmp_path / "enc.ckpt", encoder_payload(encoder, name="vit3d_test", args=encoder.build_args))
    with pytest.raises(CheckpointError, match="medctl encoder checkpoint"):
        load_classifier(tmp_path / "enc.ckpt")

