"""BYOL's rotation and jigsaw heads learn on data that has an orientation: their losses fall well below
chance (ln 4, ln K). Their inputs keep that orientation: no flips, which would make a 180 degree rotation
the double flip of the view and swap blocks behind the jigsaw's back."""

from __future__ import annotations

import math

import pytest
import torch

import medctl.pretrain.byol as byol_module
from medctl.models.registry import build_encoder
from medctl.pretrain import build_method
from medctl.pretrain.byol import ByolSettings
from medctl.pretrain.run import pretext_vs_chance
from medctl.pretrain.views import reorient_intensity

SIZE = (8, 16, 16)


def structured_volumes(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, *SIZE) volumes of one orientation: ramps of slopes 1, 2, 4 along D, H, W (every block and
    direction has its own level) under a random contrast and noise."""
    grids = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in SIZE), indexing="ij")
    template = grids[0] + 2 * grids[1] + 4 * grids[2]  # (D, H, W)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, 1, generator=generator)
    return contrast * template + 0.1 * torch.randn(n, 1, *SIZE, generator=generator)


def head_losses(head: str, steps: int, **settings) -> list[float]:
    """Train BYOL with one pretext head on; that head's loss at each step."""
    torch.manual_seed(0)
    weights = {
        "reconstruction_weight": 0.0,
        "rotation_weight": 0.0,
        "jigsaw_weight": 0.0,
        f"{head}_weight": 1.0,
    }
    # these volumes' orientation IS their linear trend, which pretext_reorient would take away
    config = ByolSettings(projector_dim=16, projector_hidden=32, pretext_reorient=0.0, **weights, **settings)
    method = build_method("byol", build_encoder("mt3_tiny", input_size=SIZE), config)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        out = method(structured_volumes(16, generator))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.update_target(0.99)
        losses.append(float(out[f"loss_{head}"]))
    return losses


@pytest.mark.parametrize("head", ["rotation", "jigsaw"])
def test_pretext_inputs_keep_the_orientation_the_byol_views_flip(head, monkeypatch):
    seen = []
    original = getattr(byol_module, f"random_{head}")

    def record(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(byol_module, f"random_{head}", record)
    no_photometric = dict(
        view_crop_scale=[1.0, 1.0], view_intensity_jitter=0.0, view_noise_std=0.0, view_blur_prob=0.0
    )
    weights = {
        "reconstruction_weight": 0.0,
        "rotation_weight": 0.0,
        "jigsaw_weight": 0.0,
        f"{head}_weight": 1.0,
    }
    config = ByolSettings(
        projector_dim=8,
        projector_hidden=16,
        view_flip_prob=1.0,
        pretext_reorient=0.0,
        **no_photometric,
        **weights,
    )
    method = build_method("byol", build_encoder("mt3_tiny", input_size=SIZE), config)
    x = structured_volumes(2, torch.Generator().manual_seed(0))
    method(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], x, atol=1e-4, rtol=1e-4)  # not x.flip(2, 3, 4), as the BYOL views are
    reoriented = build_method(
        "byol",
        build_encoder("mt3_tiny", input_size=SIZE),
        config.model_copy(update={"pretext_reorient": 1.0}),
    )
    reoriented(
        x
    )  # the default: the same view, its linear trend replaced by a random one (views.reorient_intensity)
    assert not torch.allclose(seen[1], x, atol=1e-2)  # the trend differs, the rest is the same view
    torch.testing.assert_close(
        reorient_intensity(seen[1], 0.0), reorient_intensity(x, 0.0), atol=1e-3, rtol=1e-3
    )


@pytest.mark.slow
def test_rotation_head_learns_the_orientation():
    losses = head_losses("rotation", 30)
    assert sum(losses[:5]) / 5 > 0.8 * math.log(4)  # starts at chance
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(4)  # below ln 2: the bound flipped views put on it


@pytest.mark.slow
def test_jigsaw_head_learns_the_block_order():
    losses = head_losses("jigsaw", 80, jigsaw_permutations=24)
    assert sum(losses[:5]) / 5 > 0.9 * math.log(24)
    assert sum(losses[-5:]) / 5 < 0.75 * math.log(24)


def test_pretrain_sets_each_pretext_loss_beside_its_chance_and_warns_for_a_head_that_learned_nothing(caplog):
    config = ByolSettings(projector_dim=8, projector_hidden=16, jigsaw_permutations=24)
    method = build_method("byol", build_encoder("mt3_tiny", input_size=SIZE), config)
    assert method.chance_losses() == {
        "loss_rotation": pytest.approx(math.log(4)),
        "loss_jigsaw": pytest.approx(math.log(24)),
    }
    history = [
        {"train_loss_rotation": 1.40, "train_loss_jigsaw": 3.20},
        {"train_loss_rotation": 0.60, "train_loss_jigsaw": 3.10},  # only the last epoch counts
    ]
    with caplog.at_level("INFO", logger="medctl"):
        report = pretext_vs_chance(method, "byol", history)
    assert report["rotation"] == {"final_loss": 0.60, "chance": pytest.approx(math.log(4)), "learned": True}
    assert report["jigsaw"]["learned"] is False and report["jigsaw"]["final_loss"] == 3.10
    warnings = [r.getMessage() for r in caplog.records if "warning" in r.getMessage()]
    assert len(warnings) == 1 and "byol's jigsaw head ended at loss 3.100 against 3.178" in warnings[0]
    assert "over 24 classes" in warnings[0] and "pretrain.byol.jigsaw_weight=0" in warnings[0]
    without_heads = build_method(
        "byol", build_encoder("mt3_tiny", input_size=SIZE),
        ByolSettings(projector_dim=8, projector_hidden=16, rotation_weight=0.0, jigsaw_weight=0.0),
    )  # fmt: skip
    assert pretext_vs_chance(without_heads, "byol", history) == {}
