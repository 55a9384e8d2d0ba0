"""The three pretraining methods on random tensors: they learn, keep their shapes, reject what cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medctl.config import PretrainConfig, load_config
from medctl.errors import ConfigError
from medctl.models.registry import build_encoder
from medctl.pretrain import METHODS, build_method, method_settings
from medctl.pretrain.byol import ByolSettings, EmbeddingDecoder
from medctl.pretrain.embeddings import effective_rank
from medctl.pretrain.jepa import JepaSettings
from medctl.pretrain.mim_contrastive import MIMContrastiveSettings, masked_l1

TINY_MT3 = {"stem_channels": (4, 8), "embed_dim": 32, "depth": 1, "num_heads": 2}


def tiny(name: str, size: tuple[int, ...]):
    args = TINY_MT3 if name == "mt3_tiny" else {}
    return build_encoder(name, in_channels=1, input_size=size, **args)


def byol(size=(8, 8, 8), **settings):
    base = dict(projector_dim=16, projector_hidden=32, jigsaw_permutations=6)
    return build_method("byol", tiny("mt3_tiny", size), ByolSettings(**(base | settings)))


def mim(size=(32, 32), encoder="unet2d_tiny", **settings):
    base = dict(projector_dim=16, projector_hidden=32, patch_size=8, halves_unsharp_amount=0.5)
    return build_method("mim_contrastive", tiny(encoder, size), MIMContrastiveSettings(**(base | settings)))


def jepa(size=(8, 32, 32), encoder="vit3d_test", **settings):
    base = dict(
        predictor_dim=32, predictor_heads=2, predictor_depth=1, mask_blocks=2, mask_block_scale=[0.15, 0.25]
    )
    return build_method("jepa", tiny(encoder, size), JepaSettings(**(base | settings)))


def loss_at_fixed_draws(method, x, seed=123) -> float:
    """The loss on ``x`` with the views/masks of a fixed RNG state, BatchNorm in training mode as in a step."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        value = float(method(x)["loss"])
    torch.set_rng_state(state)
    return value


def train(method, x, steps: int, lr: float) -> None:
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        method(x)["loss"].backward()
        optimizer.step()
        method.update_target(0.9)


@pytest.mark.parametrize(
    ("make", "shape", "steps", "lr"),
    [
        (byol, (4, 1, 8, 8, 8), 25, 3e-3),
        (mim, (4, 1, 32, 32), 30, 3e-3),
        (jepa, (4, 1, 8, 32, 32), 30, 1e-3),
    ],
    ids=["byol", "mim_contrastive", "jepa"],
)
def test_loss_on_a_fixed_batch_falls(make, shape, steps, lr, seed):
    method = make()
    method.train()
    x = torch.randn(shape)  # (B, C, *S)
    before = loss_at_fixed_draws(method, x)
    train(method, x, steps, lr)
    after = loss_at_fixed_draws(method, x)
    assert after < 0.8 * before, (before, after)


def test_byol_reports_every_active_head_and_drops_switched_off_ones(seed):
    out = byol(decorrelation_weight=2.0)(torch.randn(2, 1, 8, 8, 8))
    assert {
        "loss",
        "loss_byol",
        "loss_decorrelation",
        "loss_reconstruction",
        "loss_rotation",
        "acc_rotation",
        "loss_jigsaw",
        "acc_jigsaw",
    } == set(out)
    expected = (
        out["loss_byol"]
        + 2.0 * out["loss_decorrelation"]
        + 1.0 * out["loss_reconstruction"]
        + 0.5 * out["loss_rotation"]
        + 0.5 * out["loss_jigsaw"]
    )
    torch.testing.assert_close(out["loss"], expected)
    plain = byol(decorrelation_weight=0, reconstruction_weight=0, rotation_weight=0, jigsaw_weight=0)
    assert plain.decoder is None and plain.rotation_head is None and plain.jigsaw_head is None
    assert set(plain(torch.randn(2, 1, 8, 8, 8))) == {"loss", "loss_byol"}
    assert plain.reconstruct(torch.randn(2, 1, 8, 8, 8)) is None


def held_rank(method, held: torch.Tensor) -> float:
    """Effective rank of the online encoder's embeddings of ``held`` (N, C, *S), in eval mode."""
    method.eval()
    with torch.no_grad():
        rank = effective_rank(method.embed(held).numpy())
    method.train()
    return rank


def test_byol_s_decorrelation_term_keeps_the_rank_plain_byol_loses(seed):
    """mt3 has no batch statistics: plain BYOL at a high learning rate lets its embedding's directions go (the
    count family's collapse, RESULTS.md, in miniature); with the term on, the same steps keep them."""
    x, held = torch.randn(8, 1, 8, 16, 16), torch.randn(32, 1, 8, 16, 16)
    ranks = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        method = byol((8, 16, 16), reconstruction_weight=0, rotation_weight=0, jigsaw_weight=0, decorrelation_weight=weight)
        before = held_rank(method, held)
        train(method, x, 40, 1e-2)
        ranks[weight] = held_rank(method, held) / before
    assert ranks[0.0] < 0.6, ranks  # plain BYOL: measured 0.43x
    assert ranks[5.0] > 0.85, ranks  # measured 0.98x


def test_byol_target_is_an_ema_of_the_online_network_and_takes_no_gradient(seed):
    method = byol(reconstruction_weight=0, rotation_weight=0, jigsaw_weight=0)
    assert not any(p.requires_grad for p in method.target_encoder.parameters())
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    online = [p.clone() for p in method.encoder.parameters()]
    target = [p.clone() for p in method.target_encoder.parameters()]
    method.update_target(1.0)  # momentum 1: the target stays
    for t, p in zip(target, method.target_encoder.parameters(), strict=True):
        torch.testing.assert_close(p, t)
    method.update_target(0.75)
    for t, o, p in zip(target, online, method.target_encoder.parameters(), strict=True):
        torch.testing.assert_close(p, 0.75 * t + 0.25 * o)


def test_byol_works_on_2d_encoders_without_the_jigsaw():
    method = build_method(
        "byol",
        build_encoder("resnet_test_2d", input_size=(32, 32)),
        ByolSettings(projector_dim=16, projector_hidden=32, jigsaw_weight=0),
    )
    out = method(torch.randn(2, 1, 32, 32))
    assert out["loss"].requires_grad and "loss_rotation" in out and "loss_jigsaw" not in out
    shown = method.reconstruct(torch.randn(2, 1, 32, 32))
    assert shown["reconstruction"].shape == (2, 1, 32, 32) and not shown["mask"].any()


@pytest.mark.parametrize("size", [(8, 16, 16), (10, 24, 20), (64, 48), (9, 9)])
def test_embedding_decoder_reaches_any_input_size(size):
    decoder = EmbeddingDecoder(32, 2, size)
    assert decoder(torch.randn(3, 32)).shape == (3, 2, *size)


def test_impossible_byol_settings_are_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"jigsaw_weight.*2D; set pretrain.byol.jigsaw_weight = 0"):
        build_method("byol", build_encoder("unet2d_tiny", input_size=(32, 32)), ByolSettings(jigsaw_weight=0.5))
    with pytest.raises(ConfigError, match=r"rotation_weight.*equal sizes in plane axial") as info:
        byol(size=(16, 16, 24), jigsaw_weight=0)
    assert "pretrain.byol.rotation_plane" in str(info.value)
    byol(size=(16, 16, 24), rotation_plane="sagittal")  # (D, H) = (16, 16) rotates fine
    with pytest.raises(ConfigError, match=r"even D, H, W"):
        byol(size=(9, 16, 16), rotation_weight=0)
    with pytest.raises(ConfigError) as both:  # every problem at once
        byol(size=(9, 16, 24))
    assert len(both.value.problems) == 2


def test_mim_contrastive_masks_are_anti_mirrored_and_the_loss_counts_masked_pixels_only(seed):
    method = mim(size=(32, 64))
    mask = method.pixel_mask(5, torch.device("cpu"))  # (B, H, W)
    left, right = mask[..., :32], mask[..., 32:]
    assert not (left & right.flip(-1)).any()  # nothing hidden on both sides
    per_half = round(0.35 * (32 // 8) * (32 // 8)) * 64
    assert (left.sum(dim=(1, 2)) == per_half).all() and (right.sum(dim=(1, 2)) == per_half).all()

    target = torch.randn(5, 1, 32, 64)
    prediction = torch.randn(5, 1, 32, 64)
    expected = sum(
        abs(float(prediction[b, 0, i, j]) - float(target[b, 0, i, j]))
        for b in range(5) for i in range(32) for j in range(64) if mask[b, i, j]
    ) / int(mask.sum())  # fmt: skip
    assert float(masked_l1(prediction, target, mask)) == pytest.approx(expected, rel=1e-5)
    changed = torch.where(mask[:, None], prediction, prediction + 100.0)  # change visible pixels only
    assert float(masked_l1(changed, target, mask)) == pytest.approx(expected, rel=1e-5)


def test_mim_contrastive_feeds_the_full_slice_with_both_masks_to_the_unet(seed, monkeypatch):
    method = mim(size=(32, 32))
    seen = []
    decode = method.encoder.decode

    def spy(features):
        seen.append(features)
        return decode(features)

    monkeypatch.setattr(method.encoder, "decode", spy)
    out = method(torch.randn(3, 1, 32, 32))
    assert {"loss", "loss_contrastive", "loss_mim"} == set(out)
    assert len(seen) == 1 and seen[0][0].shape == (3, 4, 32, 32)  # full width, not a half
    shown = method.reconstruct(torch.randn(2, 1, 32, 32))
    assert shown["reconstruction"].shape == (2, 1, 32, 32) and shown["mask"].shape == (2, 1, 32, 32)
    again = method.reconstruct(torch.randn(2, 1, 32, 32))
    assert torch.equal(shown["mask"], again["mask"])  # panels use one fixed mask


@pytest.mark.parametrize("positives", ["views", "mirror"])
def test_mim_contrastive_positives_are_two_views_of_one_half_or_the_other_half(seed, positives):
    """Without crops and jitter the two views of a half are the half itself: "views" then contrasts each of
    the 2B halves with itself, "mirror" each left half with its right half; a reference InfoNCE says which."""
    still = dict(
        halves_crop_scale=[1.0, 1.0], halves_intensity_jitter=0.0, halves_noise_std=0.0, halves_blur_prob=0.0,
        halves_unsharp_amount=0.0,
    )  # fmt: skip
    method = mim(size=(32, 32), halves_positives=positives, mim_weight=0.0, **still)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():  # BatchNorm in training mode, as in a step
        left, right = method.encoder.forward_features(x[..., :16]), method.encoder.forward_features(x[..., 16:])
        halves = torch.cat([left, right]) if positives == "views" else left  # (N, E, 4, 2) first views
        partners = torch.cat([left, right]) if positives == "views" else right  # their positives
        z = torch.nn.functional.normalize(method.projector(torch.cat([halves, partners]).mean(dim=(2, 3))), dim=1)
        a, b = z.split(len(halves))  # (N, P) each
        logits = torch.cat([a, b]) @ torch.cat([a, b]).T / 0.2  # (2N, 2N)
        n = len(a)
        logits.fill_diagonal_(float("-inf"))
        reference = torch.nn.functional.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
        loss = float(method(x)["loss_contrastive"])
    assert loss == pytest.approx(float(reference), rel=1e-4)
    if positives == "views":
        assert loss < torch.log(torch.tensor(2.0 * n - 1)).item()  # positives identical


def test_impossible_mim_settings_are_rejected():
    with pytest.raises(ConfigError, match="needs a 2D encoder with a decoder"):
        build_method("mim_contrastive", tiny("mt3_tiny", (8, 16, 16)), MIMContrastiveSettings())
    with pytest.raises(ConfigError, match="W by twice the patch"):
        mim(size=(32, 48), patch_size=16)
    with pytest.raises(ConfigError, match="mask_ratio.*<= 0.5"):
        mim(mask_ratio=0.6)
    with pytest.raises(ConfigError, match="both 0"):
        mim(contrastive_weight=0, mim_weight=0)


def test_jepa_predicts_layer_normed_target_features(seed):
    method = jepa()
    context, targets = method.masks(2, torch.Generator().manual_seed(0))
    assert len(targets) == 2
    for target in targets:
        assert not set(context[0].tolist()) & set(target[0].tolist())
    features = method.encoder.forward_features(torch.randn(2, 1, 8, 32, 32), masks=context)
    prediction = method.predictor(features, context, targets[0])
    assert prediction.shape == (2, targets[0].shape[1], 64)
    out = method(torch.randn(2, 1, 8, 32, 32))
    assert out["loss"].requires_grad and float(out["target_std"]) > 0
    assert method.reconstruct(torch.randn(1, 1, 8, 32, 32)) is None


def test_impossible_jepa_settings_are_rejected():
    with pytest.raises(ConfigError, match="jepa needs a 3D ViT"):
        build_method("jepa", tiny("mt3_tiny", (8, 16, 16)), JepaSettings())
    with pytest.raises(ConfigError, match="not divisible by pretrain.jepa.predictor_heads"):
        jepa(predictor_dim=40, predictor_heads=3)
    with pytest.raises(ConfigError, match="leave fewer than"):
        jepa(mask_blocks=8, mask_block_scale=[1.0, 1.0])


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_is_built_from_its_own_typed_table(name):
    """Its table's values reach the method, its defaults fill the rest, the shared keys stay out of it."""
    spec = METHODS[name]
    changed = next(k for k, f in spec.settings.model_fields.items() if f.annotation is int)
    value = spec.settings.model_fields[changed].default + 8
    settings = method_settings(PretrainConfig(method=name, **{name: {changed: value}}))
    assert type(settings) is spec.settings and getattr(settings, changed) == value
    assert settings.model_dump() == spec.settings(**{changed: value}).model_dump()
    assert not set(spec.settings.model_fields) & set(PretrainConfig.model_fields)
    other = next(n for n in METHODS if n != name)  # another method's table never leaks into this one
    assert method_settings(PretrainConfig(method=other, **{name: {changed: value}})) == METHODS[other].settings()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "config" / "pretrain").glob("*.toml")), ids=lambda p: p.stem
)
def test_the_shipped_pretrain_configs_build_their_method(path):
    config = load_config(path)
    encoder = build_encoder(
        config.model.encoder, input_size=config.data.preprocess.spatial_size, **config.model.encoder_args
    )
    method = build_method(
        config.pretrain.method, encoder, method_settings(config.pretrain)
    )  # the constructors' checks at real sizes
    assert type(method) is METHODS[config.pretrain.method].module
