"""Attribution methods on tiny 2D/3D CNN and token models that follow the Encoder/Classifier contract."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from medctl.config import SaliencyConfig, load_config
from medctl.errors import ConfigError, UserError
from medctl.saliency import (
    METHODS,
    ClassScores,
    auto_internal_batch_size,
    compute_map,
    integrated_gradients_attribution,
    resolve_methods,
)
from medctl.saliency.attribution import (
    gradcam_target,
    measure_sample_bytes,
    spatial_window,
    token_gradcam,
)
from saliency_support import TinyClassifier, TinyCNN, make_model

SIZES = {3: (8, 16, 16), 2: (16, 16)}
SETTINGS = SaliencyConfig(ig_steps=8, occlusion_window=[4, 8, 8], occlusion_stride=[4, 8, 8])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_kind", ["cnn", "tokens"])
@pytest.mark.parametrize("dims", [3, 2])
def test_every_method_gives_a_finite_map_of_the_input_shape(method, model_kind, dims, seed):
    size = SIZES[dims]
    model = make_model(model_kind, dims, {"grade": 3}, size)
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *size)  # (1, C, *S)

    amap = compute_map(method, scores, x, 2, SETTINGS)

    assert amap.shape == size
    assert amap.dtype == np.float32
    assert np.all(np.isfinite(amap))
    if method in (
        "gradcam",
        "hirescam",
    ):  # a ReLU'd CAM may be empty for one class of a random model, not for all
        amap = amap + sum(compute_map(method, scores, x, k, SETTINGS) for k in (0, 1))
    assert np.abs(amap).max() > 0  # the model depends on its input, so every method sees something
    if method in ("gradients", "gradcam", "hirescam"):
        assert amap.min() >= 0  # magnitudes and ReLU'd CAMs


def test_multichannel_inputs_reduce_to_one_spatial_map(seed):
    model = TinyClassifier(TinyCNN(3, in_channels=2), {"grade": 3}).eval()
    x = torch.randn(1, 2, 8, 16, 16)  # (1, C, D, H, W)
    for method in METHODS:
        assert compute_map(method, ClassScores(model, "grade", "multiclass"), x, 0, SETTINGS).shape == (
            8,
            16,
            16,
        )


def test_integrated_gradients_is_complete(seed):
    """Sum of IG attributions equals F(x) - F(0) (Captum's convergence delta) for each class."""
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])
    with torch.no_grad():
        difference = scores(x) - scores(torch.zeros_like(x))  # (1, K)
    for target in range(3):
        attributions, delta = integrated_gradients_attribution(
            scores, x, target, n_steps=32, internal_batch_size=32
        )
        assert attributions.shape == x.shape
        total = attributions.sum().item()
        assert total - difference[0, target].item() == pytest.approx(delta.item(), abs=1e-4)
        assert abs(delta.item()) <= 0.02 * abs(difference[0, target].item()) + 1e-4


def test_internal_batch_size_does_not_change_integrated_gradients(seed):
    model = make_model("tokens", 2, {"grade": 3}, SIZES[2])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[2])
    one, _ = integrated_gradients_attribution(scores, x, 1, n_steps=6, internal_batch_size=1)
    all_at_once, _ = integrated_gradients_attribution(scores, x, 1, n_steps=6, internal_batch_size=6)
    np.testing.assert_allclose(
        one.numpy(), all_at_once.numpy(), rtol=1e-4, atol=1e-6
    )  # not torch.testing: it imports dynamo (seconds)


def test_binary_negative_class_is_the_negated_logit(seed):
    model = make_model("cnn", 3, {"edema": 1}, SIZES[3])
    scores = ClassScores(model, "edema", "binary")
    x = torch.randn(1, 1, *SIZES[3])
    with torch.no_grad():
        logit = model(x)["edema"][0, 0]
        both = scores(x)[0]  # (2,)
        probabilities = scores.probabilities(scores(x))[0]
    assert both.tolist() == pytest.approx([-logit.item(), logit.item()])
    assert probabilities[1].item() == pytest.approx(torch.sigmoid(logit).item())
    assert probabilities.sum().item() == pytest.approx(1.0)
    for method in ("integrated_gradients", "gradients", "occlusion"):
        positive = compute_map(method, scores, x, 1, SETTINGS)
        negative = compute_map(method, scores, x, 0, SETTINGS)
        expected = positive if method == "gradients" else -positive  # |grad| is sign-free
        np.testing.assert_allclose(negative, expected, rtol=1e-4, atol=1e-6)


def test_binary_kind_with_a_wide_head_is_a_user_error(seed):
    model = make_model("cnn", 3, {"edema": 2}, SIZES[3])
    with pytest.raises(UserError, match="one logit"):
        ClassScores(model, "edema", "binary")(torch.randn(1, 1, *SIZES[3]))
    with pytest.raises(UserError, match="no head `grade`.*edema"):
        ClassScores(model, "grade", "multiclass")(torch.randn(1, 1, *SIZES[3]))


def test_token_gradcam_drops_the_class_token_and_follows_the_grid(seed):
    model = make_model("tokens", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])
    cam = token_gradcam(scores, model.encoder.gradcam_layer, (2, 4, 4), x, 0)  # (1, 1, *grid)
    assert cam.shape == (1, 1, 2, 4, 4)
    # reference: the same CAM from the block's output, computed directly
    captured = []
    handle = model.encoder.gradcam_layer.register_forward_hook(lambda m, i, o: captured.append(o))
    x = x.requires_grad_(True)
    score = scores(x)[0, 0]
    handle.remove()
    tokens = captured[0][:, 1:]  # (1, 32, C) without the class token
    (grads,) = torch.autograd.grad(score, captured[0])
    weights = grads[:, 1:].mean(1)  # (1, C)
    reference = torch.relu(tokens @ weights[0]).reshape(1, 1, 2, 4, 4)
    np.testing.assert_allclose(cam.numpy(), reference.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_a_chosen_cnn_layer_is_read_as_a_map_at_its_own_resolution(seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])
    chosen = SETTINGS.model_copy(update={"gradcam_layer": "stem.0"})  # the full-resolution conv, before the max-pool

    amap = compute_map("gradcam", scores, x, 1, chosen)

    reference = LayerGradCam(scores, model.encoder.stem[0]).attribute(x, target=1, relu_attributions=True)
    assert reference.shape == (1, 1, *SIZES[3])  # no upsampling at this layer
    np.testing.assert_allclose(amap, reference[0, 0].detach().numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(amap, compute_map("gradcam", scores, x, 1, SETTINGS))  # the default: blocks[-1]


def test_a_chosen_token_layer_is_read_as_tokens(seed):
    model = make_model("tokens", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])

    amap = compute_map("gradcam", scores, x, 0, SETTINGS.model_copy(update={"gradcam_layer": "blocks.0"}))

    cam = token_gradcam(scores, model.encoder.blocks[0], (2, 4, 4), x, 0)  # (1, 1, *grid)
    upsampled = torch.nn.functional.interpolate(cam, size=SIZES[3], mode="trilinear")[0, 0]
    np.testing.assert_allclose(amap, upsampled.detach().numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dims", [3, 2])
def test_hirescam_equals_gradcam_where_the_layer_is_average_pooled_into_the_head(dims, seed):
    model = make_model("cnn", dims, {"grade": 3}, SIZES[dims])  # blocks[-1] -> mean over positions -> linear
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[dims])
    maps = {m: [compute_map(m, scores, x, k, SETTINGS) for k in range(3)] for m in ("hirescam", "gradcam")}
    np.testing.assert_allclose(np.stack(maps["hirescam"]), np.stack(maps["gradcam"]), rtol=1e-4, atol=1e-6)
    assert max(m.max() for m in maps["hirescam"]) > 0  # ReLU'd: some class has positive evidence
    # a finer layer is not pooled straight into the head: there the two differ
    stem = SETTINGS.model_copy(update={"gradcam_layer": "stem.0"})
    finer = {
        m: np.stack([compute_map(m, scores, x, k, stem) for k in range(3)]) for m in ("hirescam", "gradcam")
    }
    assert finer["hirescam"].max() > 0 and not np.allclose(finer["hirescam"], finer["gradcam"])


def test_token_hirescam_keeps_each_tokens_gradient(seed):
    model = make_model("tokens", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])
    cam = token_gradcam(
        scores, model.encoder.gradcam_layer, (2, 4, 4), x, 1, elementwise=True
    )  # (1, 1, *grid)
    captured = []
    handle = model.encoder.gradcam_layer.register_forward_hook(lambda m, i, o: captured.append(o))
    score = scores(x.clone().requires_grad_(True))[0, 1]
    handle.remove()
    (grads,) = torch.autograd.grad(score, captured[0])  # (1, 1 + 32, C)
    reference = torch.relu((grads * captured[0])[:, 1:].sum(-1)).reshape(1, 1, 2, 4, 4)
    np.testing.assert_allclose(cam.numpy(), reference.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_an_unknown_gradcam_layer_names_the_key_and_the_closest_modules(seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3])
    with pytest.raises(ConfigError) as info:
        gradcam_target(model.encoder, "blocks.2")
    message = str(info.value)
    assert "saliency.gradcam_layer" in message and "'blocks.2'" in message
    assert "did you mean blocks.1, blocks.0" in message and "modules are stem, blocks (" in message
    assert gradcam_target(model.encoder, "") == (model.encoder.blocks[-1], "map")


def test_unknown_method_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as info:
        resolve_methods(["integrated_gradients", "lime", "shap"])
    message = str(info.value)
    assert "saliency.methods" in message and "'lime'" in message and "'shap'" in message
    assert "gradcam" in message and "occlusion" in message
    with pytest.raises(ConfigError, match="saliency.methods"):
        resolve_methods([])
    assert resolve_methods(["gradcam", "gradcam", "occlusion"]) == ["gradcam", "occlusion"]


def test_impossible_settings_are_rejected_all_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides=[
                "saliency.ig_steps=1", "saliency.occlusion_window=[0, 8, 8]", "saliency.occlusion_stride=[]",
                "saliency.internal_batch_size=-1",
            ]
        )  # fmt: skip
    message = str(info.value)
    for key in ("ig_steps", "occlusion_window", "occlusion_stride", "internal_batch_size"):
        assert f"saliency.{key}" in message


def test_occlusion_window_fits_the_input():
    assert spatial_window([4, 8, 8], (8, 16, 16), "occlusion_window") == (4, 8, 8)
    assert spatial_window([4, 8, 8], (16, 16), "occlusion_window") == (8, 8)  # 2D keeps the in-plane sizes
    assert spatial_window([4, 32, 32], (2, 16, 16), "occlusion_window") == (2, 16, 16)  # clamped
    with pytest.raises(ConfigError, match="saliency.occlusion_stride"):
        spatial_window([4, 8], (8, 16, 16), "occlusion_stride")


def test_automatic_batch_size_follows_the_memory_budget(seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[3])
    per_sample = measure_sample_bytes(scores, x, 0)
    # at least the first conv's output (width 8 x all voxels, float32) is saved for backward
    assert per_sample >= 8 * x.numel() * 4
    assert auto_internal_batch_size(scores, x, 0, limit=32, budget_bytes=3 * per_sample) == 3
    assert auto_internal_batch_size(scores, x, 0, limit=32, budget_bytes=per_sample // 2) == 1
    assert auto_internal_batch_size(scores, x, 0, limit=32) == 32  # the 2 GiB CPU budget fits all steps


def test_guided_backprop_without_relu_says_it_is_plain_gradients(seed, caplog):
    model = make_model("tokens", 2, {"grade": 3}, SIZES[2])
    scores = ClassScores(model, "grade", "multiclass")
    x = torch.randn(1, 1, *SIZES[2])
    with caplog.at_level(logging.INFO, logger="medctl"):
        guided = compute_map("guided_backprop", scores, x, 1, SETTINGS)
    assert "no nn.ReLU" in caplog.text
    x_grad = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(scores(x_grad)[0, 1], x_grad)
    np.testing.assert_allclose(guided, plain[0, 0].numpy(), rtol=1e-4, atol=1e-7)


def test_inplace_relus_are_restored_and_training_mode_kept(seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3]).train()
    scores = ClassScores(model, "grade", "multiclass")
    compute_map("guided_backprop", scores, torch.randn(1, 1, *SIZES[3]), 0, SETTINGS)
    assert all(m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))
    assert model.training


def test_maps_are_computed_even_under_no_grad(seed):
    model = make_model("cnn", 2, {"grade": 3}, SIZES[2])
    with torch.no_grad():
        amap = compute_map(
            "gradcam", ClassScores(model, "grade", "multiclass"), torch.randn(1, 1, 16, 16), 0, SETTINGS
        )
    assert amap.shape == (16, 16)


def test_a_batch_of_inputs_is_refused(seed):
    model = make_model("cnn", 2, {"grade": 3}, SIZES[2])
    with pytest.raises(UserError, match="one input"):
        compute_map(
            "gradients", ClassScores(model, "grade", "multiclass"), torch.randn(2, 1, 16, 16), 0, SETTINGS
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_match_cpu_and_the_batch_is_sized_from_measured_memory(seed):
    model = make_model("cnn", 3, {"grade": 3}, SIZES[3])
    x = torch.randn(1, 1, *SIZES[3])
    cpu = {m: compute_map(m, ClassScores(model, "grade", "multiclass"), x, 1, SETTINGS) for m in METHODS}
    scores = ClassScores(model.cuda(), "grade", "multiclass")
    for method, expected in cpu.items():
        np.testing.assert_allclose(
            compute_map(method, scores, x.cuda(), 1, SETTINGS), expected, rtol=1e-3, atol=1e-5
        )
    per_sample = measure_sample_bytes(scores, x.cuda(), 1)
    assert per_sample > x.numel() * 4
    assert auto_internal_batch_size(scores, x.cuda(), 1, limit=8, budget_bytes=2 * per_sample) == 2
