"""Pointing game, mass in mask and the model-randomisation check, on hand-built maps and a trained model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medctl.config import SaliencyConfig
from medctl.saliency import (
    ClassScores,
    compute_map,
    mask_share,
    mass_in_mask,
    pointing_chance,
    pointing_game,
    randomised_copy,
    rank_correlation,
)
from medctl.saliency.outputs import random_weight_hits, summary_lines
from medctl.saliency.scoring import (
    baseline_rows,
    describe,
    edge_map,
    intensity_map,
    judge,
    last_block,
    peak_voxel,
    summarise,
)
from saliency_support import ball, blob_batch, make_model, train_blob_classifier


def test_pointing_game_on_hand_built_maps():
    mask = np.zeros((4, 8, 8), bool)
    mask[1:3, 2:4, 2:4] = True
    amap = np.zeros((4, 8, 8), np.float32)
    amap[2, 3, 3] = 1.0
    assert pointing_game(amap, mask) is True
    amap[0, 7, 7] = -2.0  # the peak of |map| counts, whatever its sign
    assert pointing_game(amap, mask) is False
    amap[0, 7, 7] = 0.0
    amap[3, 4, 4] = 5.0  # one voxel diagonally outside the mask
    assert pointing_game(amap, mask) is False
    assert pointing_game(amap, mask, tolerance=1) is True
    assert pointing_game(amap, np.zeros_like(mask)) is None  # nothing to point at
    assert pointing_game(np.zeros_like(amap), mask) is False  # no peak: a miss, still in the denominator


def test_a_plateau_points_with_its_centre_not_its_first_voxel():
    # a 2x2x2 map upsampled to 16^3 with clamped edges: its largest cell becomes a 4x4x4-voxel flat corner
    coarse = torch.zeros(1, 1, 2, 2, 2)
    coarse[0, 0, 0, 0, 0] = 1.0
    fine = torch.nn.functional.interpolate(coarse, size=(16, 16, 16), mode="trilinear")[0, 0].numpy()
    assert (fine == fine.max()).sum() == 4**3  # voxels 0..3 on each axis tie
    assert np.unravel_index(np.argmax(fine), fine.shape) == (0, 0, 0)  # argmax: the corner
    assert peak_voxel(fine) == (1, 1, 1)  # a tied voxel nearest the plateau's centroid (1.5, 1.5, 1.5)
    flat = np.zeros((5, 7, 9), np.float32)
    flat[1:4, 2:5, 3:8] = 1.0  # a flat box: its centre, not the corner argmax would give
    assert peak_voxel(flat) == (2, 3, 5)
    mask = np.zeros(flat.shape, bool)
    mask[2, 3, 5] = True
    assert pointing_game(flat, mask) is True
    assert peak_voxel(np.eye(3)) == (1, 1)  # disjoint ties: the tied voxel nearest their centroid


def test_mass_in_mask_counts_positive_attribution_only():
    mask = np.array([[1, 1, 0, 0]], bool)
    amap = np.array([[3.0, 1.0, 4.0, -10.0]])
    assert mass_in_mask(amap, mask) == pytest.approx(4.0 / 8.0)
    assert mass_in_mask(-np.abs(amap), mask) == 0.0  # nothing positive: nothing lands in the mask
    assert math.isnan(mass_in_mask(amap, np.zeros_like(mask)))  # no lesion: nothing to score
    assert mask_share(mask) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        mass_in_mask(amap, mask[:, :2])


def test_pointing_chance_grows_with_the_tolerance():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    assert pointing_chance(mask) == pytest.approx(1 / 125)
    assert pointing_chance(mask, tolerance=1) == pytest.approx(27 / 125)  # a 3x3x3 cube


def test_rank_correlation_is_spearman_of_magnitudes():
    a = np.array([1.0, -2.0, 3.0, 4.0])
    assert rank_correlation(a, np.array([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert rank_correlation(a, np.array([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(a, np.zeros(4)))


def test_randomised_copy_resets_heads_and_last_block_only(seed):
    model = make_model("tokens", 3, {"grade": 3}, (8, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy, reset = randomised_copy(model, scope="top")
    after = copy.state_dict()
    assert "heads.grade" in reset and any(name.startswith("encoder.gradcam_layer") for name in reset)
    assert not torch.equal(after["heads.grade.weight"], before["heads.grade.weight"])
    assert not torch.equal(after["encoder.blocks.1.qkv.weight"], before["encoder.blocks.1.qkv.weight"])
    assert torch.equal(after["encoder.blocks.0.qkv.weight"], before["encoder.blocks.0.qkv.weight"])
    assert torch.equal(after["encoder.patch_embed.weight"], before["encoder.patch_embed.weight"])
    for key, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key])
    state = torch.random.get_rng_state()
    randomised_copy(model, scope="top")
    assert torch.equal(torch.random.get_rng_state(), state)  # global randomness untouched


def test_full_randomisation_resets_every_weight(seed):
    model = make_model("tokens", 3, {"grade": 3}, (8, 16, 16))
    before = {k: v.clone() for k, v in model.named_parameters()}
    copy, reset = randomised_copy(model, scope="full")
    after = dict(copy.named_parameters())
    for name, value in before.items():
        if value.ndim >= 2:  # every weight matrix, kernel and embedding (norms reset to 1/0 may equal theirs)
            assert not torch.equal(after[name], value), name
    assert "heads.grade" in reset and "encoder.blocks.0.qkv" in reset
    with pytest.raises(ValueError, match="full or top"):
        randomised_copy(model, scope="half")


def test_last_block_is_the_one_that_runs_last(seed):
    model = make_model("tokens", 3, {"grade": 3}, (8, 16, 16))
    # a decoder registered after the blocks but unused for classification (like a UNet's)
    model.encoder.decoder = torch.nn.ModuleList([torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)])
    assert last_block(model)[0] == "encoder.decoder.1"  # without an example: the last registered
    name, block = last_block(model, torch.randn(1, 1, 8, 16, 16))
    assert name == "encoder.blocks.1" and block is model.encoder.blocks[1]
    _, reset = randomised_copy(model, example=torch.randn(1, 1, 8, 16, 16), scope="top")
    assert not any("decoder" in r for r in reset)
    assert last_block(make_model("cnn", 3, {"grade": 3}, (8, 16, 16))) is None  # CNN: no block list


def test_summary_reports_rates_and_chance_levels():
    rows = [
        {
            "method": "m",
            "pointing_hit": True,
            "pointing_chance": 0.1,
            "mass_in_mask": 0.5,
            "mask_share": 0.1,
            "seconds": 1,
        },
        {
            "method": "m",
            "pointing_hit": False,
            "pointing_chance": 0.3,
            "mass_in_mask": 0.3,
            "mask_share": 0.3,
            "seconds": 3,
        },
        {"method": "m", "pointing_hit": None, "seconds": 2},  # no mask: not scored
    ]
    summary = summarise(rows)["m"]
    assert summary["n"] == 3 and summary["n_scored"] == 2
    assert summary["pointing_hit_rate"] == 0.5
    assert summary["pointing_chance"] == pytest.approx(0.2)
    assert summary["mass_in_mask"] == pytest.approx(0.4)
    assert summary["seconds"] == pytest.approx(2.0)
    assert math.isnan(summary["randomisation_spearman"])


def test_zero_maps_stay_in_the_pointing_game_denominator():
    """A CAM whose ReLU removed everything points nowhere: a miss among all lesion samples (issue 18)."""
    mask = np.zeros((4, 8, 8), bool)
    mask[1:3, 2:4, 2:4] = True
    hit = np.zeros(mask.shape, np.float32)
    hit[2, 3, 3] = 1.0
    maps = [hit, np.zeros_like(hit), np.zeros_like(hit), hit]
    rows = [
        {"method": "cam", "pointing_hit": pointing_game(m, mask), "mass_in_mask": mass_in_mask(m, mask)}
        for m in maps
    ]
    rows.append({"method": "cam", "pointing_hit": pointing_game(hit, np.zeros_like(mask))})  # no lesion
    summary = summarise(rows)["cam"]
    assert summary["n"] == 5 and summary["n_scored"] == 4 and summary["pointing_hits"] == 2
    assert summary["pointing_hit_rate"] == 0.5 and summary["mass_in_mask"] == 0.5


def test_input_baselines_find_the_brightest_structure_and_edges_whatever_the_model():
    shape = (8, 16, 16)
    lesion = ball(shape, (4, 5, 5), 2.0)
    image = np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)
    image[lesion] += 2.0
    rows = {r["method"]: r for r in baseline_rows(image, lesion)}
    assert set(rows) == {"input_intensity", "input_edges"}
    assert rows["input_intensity"]["pointing_hit"] is True  # bright lesions: the image alone points at them
    assert rows["input_intensity"]["pointing_chance"] == pytest.approx(lesion.mean())
    np.testing.assert_allclose(edge_map(image), ndimage_edges(image))
    assert peak_voxel(intensity_map(image)) == peak_voxel(image - image.min())
    assert intensity_map(image).min() == 0.0
    # the edge map peaks on the lesion's rim: one voxel of tolerance reaches it
    assert baseline_rows(image, lesion, tolerance=1)[1]["pointing_hit"] is True
    distractor = ball(shape, (4, 11, 11), 1.5)
    image[distractor] += 4.0  # a brighter structure that is not the lesion
    rows = {r["method"]: r for r in baseline_rows(image, lesion, tolerance=1)}
    assert rows["input_intensity"]["pointing_hit"] is False and rows["input_edges"]["pointing_hit"] is False


def ndimage_edges(image):
    from scipy import ndimage

    return ndimage.gaussian_gradient_magnitude(image, sigma=1.0)


def lesion_row(method, hit, *, intensity=False, edges=False, random_hit=None, rho=None, flat="", chance=0.01):
    return {
        "method": method, "pointing_hit": hit, "pointing_chance": chance, "mask_share": chance, "mass_in_mask": 0.1,
        "input_intensity_hit": intensity, "input_edges_hit": edges, "random_weights_hit": random_hit,
        "randomisation_spearman": rho, "map_flat": flat,
    }  # fmt: skip


def baseline_scores(rows):
    """The input baselines' own summaries, read back from the hits each row carries."""
    return summarise(
        [{**r, "method": name, "pointing_hit": r[f"{name}_hit"]} for r in rows for name in ("input_intensity", "input_edges")]
    )


def test_beats_needs_a_paired_test_and_three_of_twenty_against_two_is_not_distinguishable():
    # 20 lesion samples; the edges baseline hits the first 2, intensity none
    edges = [i < 2 for i in range(20)]
    ig = [lesion_row("ig", i < 12, edges=edges[i], rho=0.66) for i in range(20)]  # 12/20, the 2 included
    occlusion = [lesion_row("occlusion", i in (0, 1, 5), edges=edges[i]) for i in range(20)]  # 3/20
    cam = [lesion_row("cam", False, edges=edges[i], flat="empty" if i < 12 else "") for i in range(20)]
    rows = ig + occlusion + cam
    judged = judge(summarise(rows), baseline_scores(ig), alpha=0.05, threshold=0.5)
    ig_, occ, cam_ = judged["ig"], judged["occlusion"], judged["cam"]
    assert ig_["input_baseline"] == "input_edges" and ig_["input_baseline_rate"] == 0.1
    comparison = ig_["comparisons"]["input_edges"]
    assert (comparison["only_method"], comparison["only_other"]) == (10, 0) and comparison["p"] < 0.01
    assert ig_["beats_input_baseline"] is True and ig_["failed"] is False
    assert "beats the input baseline (edges) (12/20 vs 2/20, p = 0.002)" in ig_["verdict"]
    # no random-weight check here: rho alone decides, and says so
    assert ig_["input_driven"] is True and "depends on the input more than the model (randomisation ρ 0.66" in ig_["verdict"]
    assert (ig_["pointing_low"], ig_["pointing_high"]) == (pytest.approx(0.387, abs=1e-3), pytest.approx(0.781, abs=1e-3))

    assert occ["beats_input_baseline"] is False and occ["failed"] is False
    assert occ["verdict"].startswith("not distinguishable from the input baseline (edges) (3/20 vs 2/20, p = 1.000)")
    assert "beats" not in occ["verdict"]

    # all misses, 12 empty maps: failed, counted, flagged; never "says nothing about the model"
    assert cam_["failed"] is True and cam_["empty_maps"] == 12 and cam_["flat_maps"] is True
    assert cam_["verdict"].startswith("the maps failed to locate the lesion (not above chance: 0/20 vs 0.010")
    assert "12 of 20 maps empty" in cam_["verdict"]
    lines = summary_lines(judged, 0.05)
    assert "Beat the input baseline (paired exact test, p < 0.05): ig." in lines
    assert any(line.startswith("Not distinguishable from the input baseline") and "occlusion" in line for line in lines)
    assert "The maps failed to locate the lesion: cam" in " ".join(lines)
    assert "Maps that point nowhere (all zero or constant): cam (12 of 20 maps empty)." in lines
    assert "says nothing about the model" not in " ".join(lines)
    assert not any(line.startswith("Too few to decide") for line in lines)  # 20 lesion samples can decide
    few = {method: {**entry, "n_scored": 4} for method, entry in judged.items()}
    assert (
        "Too few to decide: 4 lesion samples scored, and a paired exact test reaches p < 0.05 only when at least 6 "
        "samples are hit by one map and missed by the other"
    ) in " ".join(summary_lines(few, 0.05))
    line = describe("ig", ig_, lesions_in_split=40)
    assert line.startswith("ig: pointing game 0.60 [0.39, 0.78] (12/20; scored 20 of 40 lesion samples), chance 0.010 — beats")
    unchecked = judge(summarise([lesion_row("ig", True)]), {}, alpha=0.05, threshold=0.5)["ig"]
    assert unchecked["beats_input_baseline"] is False and unchecked["input_driven"] is None


def test_significantly_below_the_input_baseline_is_a_failure():
    rows = [lesion_row("cam", i == 0, intensity=i < 10, chance=0.001) for i in range(20)]  # 1/20 vs 10/20
    cam = judge(summarise(rows), baseline_scores(rows), alpha=0.05, threshold=0.5)["cam"]
    assert cam["failed"] is True and cam["beats_input_baseline"] is False
    assert cam["verdict"].startswith(
        "the maps failed to locate the lesion (significantly below the input baseline (intensity) (1/20 vs 10/20"
    )


def test_the_rho_flag_never_contradicts_a_win_over_random_weights():
    """19/20 against 3/20 with random weights at rho 0.52: the paired test decides, rho is evidence only."""
    ig = [lesion_row("ig", i < 19, random_hit=i < 3, rho=0.52) for i in range(20)]
    cam = [lesion_row("cam", i < 3, random_hit=i < 2, rho=0.6) for i in range(20)]
    judged = judge(summarise(ig + cam), {}, alpha=0.05, threshold=0.5)
    assert judged["ig"]["beats_random_weights"] is True and judged["ig"]["input_driven"] is False
    assert "beats random weights (19/20 vs 3/20, p < 0.001)" in judged["ig"]["verdict"]
    assert "depends on the input" not in judged["ig"]["verdict"]
    assert judged["cam"]["beats_random_weights"] is False and judged["cam"]["input_driven"] is True
    assert "not distinguishable from random weights (3/20 vs 2/20, p = 1.000)" in judged["cam"]["verdict"]
    assert random_weight_hits(judged["cam"]) == "2/20 (trained 3/20)"
    unchecked = judge(summarise([lesion_row("ig", True)]), {}, alpha=0.05, threshold=0.5)["ig"]
    assert unchecked["beats_random_weights"] is None and random_weight_hits(unchecked) == "—"


@pytest.fixture(scope="module")
def blob_model():
    """A TinyCNN trained for a few dozen steps to tell noise from noise with a bright ball in it."""
    return train_blob_classifier()


def test_trained_model_points_at_the_ball_far_above_chance(blob_model):
    images, labels, masks = blob_batch(32, np.random.default_rng(123))
    with torch.no_grad():
        predicted = (blob_model(torch.from_numpy(images))["blob"][:, 0] > 0).numpy()
    assert (predicted == labels).mean() >= 0.9  # the model did learn the task

    scores = ClassScores(blob_model, "blob", "binary")
    random_model, _ = randomised_copy(blob_model)
    randomised = ClassScores(random_model, "blob", "binary")
    settings = SaliencyConfig(ig_steps=16, occlusion_window=[2, 4, 4], occlusion_stride=[2, 4, 4])
    # Grad-CAM lives on the half-resolution feature map: one voxel of tolerance, and the matching chance
    tolerance = {"integrated_gradients": 0, "gradcam": 1, "hirescam": 1}
    results = {method: {"hit": [], "chance": [], "mass": [], "share": [], "rho": []} for method in tolerance}
    for i in np.flatnonzero(labels)[:8]:
        x = torch.from_numpy(images[i : i + 1])  # (1, 1, D, H, W)
        for method, grow in tolerance.items():
            amap = compute_map(method, scores, x, 1, settings)
            result = results[method]
            result["hit"].append(pointing_game(amap, masks[i], tolerance=grow))
            result["chance"].append(pointing_chance(masks[i], tolerance=grow))
            result["mass"].append(mass_in_mask(amap, masks[i]))
            result["share"].append(mask_share(masks[i]))
            result["rho"].append(rank_correlation(amap, compute_map(method, randomised, x, 1, settings)))

    ig, cam, hires = results["integrated_gradients"], results["gradcam"], results["hirescam"]
    assert np.mean(ig["share"]) < 0.02  # a ball of ~17 voxels in 2048: chance is below 2%
    assert np.mean(ig["hit"]) >= 0.8
    assert np.mean(ig["mass"]) > 10 * np.mean(ig["share"])
    assert np.mean(cam["chance"]) < 0.1
    assert np.mean(cam["hit"]) >= 0.5
    assert np.mean(cam["hit"]) > 5 * np.mean(cam["chance"])
    assert np.mean(cam["mass"]) > 3 * np.mean(cam["share"])
    # the model max-pools its last map, so only the argmax positions carry gradient: HiResCAM keeps them there
    assert np.mean(hires["hit"]) >= np.mean(cam["hit"]) and np.mean(hires["mass"]) > np.mean(cam["mass"])

    # model randomisation: maps of the re-initialised model no longer match the trained model's
    assert np.mean(ig["rho"]) < 0.9
    assert np.mean(cam["rho"]) < 0.5


def test_ball_helper_makes_the_expected_mask():
    mask = ball((8, 16, 16), (4, 8, 8), 1.6)
    assert mask.sum() == 19 and mask[4, 8, 8]
