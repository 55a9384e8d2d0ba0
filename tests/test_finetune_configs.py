"""The scenario configs under config/finetune/ validate, and every setting in them is one the stage honours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medctl.config import load_config
from medctl.data.tables import TargetSpec
from medctl.finetune.augment import build_augment
from medctl.finetune.checks import check_monitor, encoder_trainable_from, wants_feature_cache
from medctl.models.classifier import build_classifier
from medctl.models.registry import build_encoder, get_spec
from medctl.training.losses import LossSettings, build_target_loss

CONFIGS = sorted(Path("config/finetune").glob("*.toml"))


def test_every_scenario_is_here():
    assert {p.stem for p in CONFIGS} >= {
        "edema_mt3", "oct_vjepa2", "defects_convnext", "slices_unet2d", "linear_probe", "finetune",
    }  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_scenario_config_validates_and_builds(path):
    config = load_config(path, env={})
    size = config.data.preprocess.spatial_size
    name, args = config.model.encoder, config.model.encoder_args
    if name == "auto":  # read from the checkpoint: stand in the OCT plan's V-JEPA 2 ViT-L with RoPE
        assert config.model.checkpoint and not args
        name, args = "vit3d_large", {"pos_embed": "rope"}
    assert get_spec(name).spatial_dims == len(size), (
        "encoder and data.preprocess.spatial_size disagree"
    )
    first_trainable = encoder_trainable_from(config.model, config.train.epochs)
    assert config.model.unfreeze_at_epoch < config.train.epochs
    build_augment(config.train.augment, size, seed=0)  # flip axes exist for these images
    specs = [
        TargetSpec(t.name, t.kind, list(t.classes or t.columns or ["a", "b"])) for t in config.data.targets
    ]
    check_monitor(config.train.monitor, specs)
    for spec in specs:  # the loss settings fit each target's kind
        counts = np.ones((len(spec.classes), 2)) if spec.kind == "multilabel" else np.ones(len(spec.classes))
        build_target_loss(spec.kind, LossSettings.of(config.train), counts, target=spec.name)
    with torch.device("meta"):  # the real sizes, without the memory
        encoder = build_encoder(name, input_size=size, **args)
        head = config.model.head
        build_classifier(encoder, specs, kind=head.kind, hidden=head.hidden, dropout=head.dropout)
    if config.model.head.kind == "attentive" and first_trainable is None:  # tokens cached up to the cap
        assert wants_feature_cache(first_trainable, config.train, config.model, None)
