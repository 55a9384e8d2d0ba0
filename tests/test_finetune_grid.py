"""``train.grid``: a grid of probe heads trained in one pass equals the single-head runs it replaces."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli_support import one_error_line
from medctl.cli.app import app
from medctl.config import load_config
from medctl.finetune import run_finetune
from medctl.finetune.grid import GridPoint, edge_warning
from medctl.finetune.modes import ProbeHeads
from medctl.models.heads import build_head
from medctl.training.optim import param_groups_with_decay
from medctl.training.stacked import Stacked, StackedAdamW

runner = CliRunner()
EASY = ['data.preprocess.intensity="minmax"', "data.preprocess.workers=1", 'run.device="cpu"']
GRID_3x2 = "train.grid={lr_head=[0.001, 0.01, 0.1], weight_decay=[0.0, 0.5]}"


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def probe_args(dataset, tmp_path, name: str, *extra: str) -> list[str]:
    return [
        "-c", "config/finetune/linear_probe.toml", *dataset.config_overrides(), *EASY,
        'model.encoder="vit3d_test"', "model.head.dropout=0.2", "data.batch_size=4", "train.epochs=6",
        "train.warmup_epochs=1", "train.patience=2", 'train.monitor="loss"', "train.log_every=0",
        f"run.root={json.dumps(str(tmp_path / 'runs'))}", f"run.name={json.dumps(name)}", *extra,
    ]  # fmt: skip


def single_run(dataset, tmp_path, point: dict) -> dict:
    name = f"single_{point['lr_head']}_{point['weight_decay']}"
    args = probe_args(dataset, tmp_path, name, f"train.lr_head={point['lr_head']}", f"train.weight_decay={point['weight_decay']}")
    config = load_config(args[1], args[2:], env={})
    result = run_finetune(config)
    return json.loads(result.results_path.read_text()) | {"run_dir": str(result.run_dir)}


def test_a_3x2_grid_on_cached_embeddings_trains_each_head_as_its_own_run_and_keeps_the_best(synthetic_3d, tmp_path, monkeypatch):
    out = invoke("finetune", *probe_args(synthetic_3d, tmp_path, "grid", GRID_3x2))
    assert out.exit_code == 0, out.output
    run = tmp_path / "runs" / "grid"
    assert (run / "figures" / "training_curves.png").is_file()
    monkeypatch.setattr("medctl.finetune.run.plot_curves", lambda *args: None)  # the references: a second of matplotlib each
    results = json.loads((run / "results.json").read_text())
    grid = results["grid"]
    assert [(p["lr_head"], p["weight_decay"]) for p in grid] == [
        (lr, wd) for lr in (0.001, 0.01, 0.1) for wd in (0.0, 0.5)
    ]
    assert results["feature_cache"] is True

    # every head equals the single-head run with its hyperparameters and the same seed
    singles = [single_run(synthetic_3d, tmp_path, point) for point in grid]
    for point, single in zip(grid, singles, strict=True):
        assert point["best_epoch"] == single["best_epoch"], point
        assert point["epochs_trained"] == single["epochs_run"], point
        assert point["value"] == pytest.approx(single["best_metric"], abs=1e-5)
        assert point["train_loss"] == pytest.approx([row["train_loss"] for row in single["history"]], abs=1e-5)
        assert point["val_loss"] == pytest.approx([row["val_loss"] for row in single["history"]], abs=1e-5)
    assert len({p["best_epoch"] for p in grid}) > 1 or len({p["epochs_trained"] for p in grid}) > 1  # heads stop on their own

    # the selected point is the best on the selection split (val loss, lower first; ties to the smaller lr)
    selected = results["selected"]
    best_value = min(p["value"] for p in grid)
    assert selected["value"] == best_value
    assert selected["index"] == next(i for i, p in enumerate(grid) if p["value"] == best_value)
    assert results["best_metric"] == pytest.approx(best_value)
    assert results["best_epoch"] == selected["best_epoch"]
    assert results["metrics"]["loss"] == pytest.approx(best_value, abs=1e-5)

    # best.ckpt is the selected head alone, in the usual format: the single run's best.ckpt, weight for weight
    chosen = singles[selected["index"]]
    ours = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    theirs = torch.load(f"{chosen['run_dir']}/checkpoints/best.ckpt", weights_only=True)
    assert set(ours["state_dict"]) == set(theirs["state_dict"])
    for key, value in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][key], value, atol=1e-5, rtol=1e-4)

    # and medctl evaluate on val reproduces val_preds.parquet from it
    shown = invoke("evaluate", "--ckpt", str(run / "checkpoints" / "best.ckpt"), "--split", "val",
                   "--out", str(tmp_path / "eval_val"), "--bootstrap", "0")  # fmt: skip
    assert shown.exit_code == 0, shown.output
    during = pd.read_parquet(run / "val_preds.parquet")
    after = pd.read_parquet(tmp_path / "eval_val" / "val_preds.parquet")
    assert after["id"].tolist() == during["id"].tolist()
    probs = [c for c in during.columns if c.startswith("prob")]
    assert probs
    np.testing.assert_allclose(after[probs].to_numpy(), during[probs].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_an_attentive_grid_on_cached_tokens_equals_its_single_runs(synthetic_3d, tmp_path, monkeypatch):
    monkeypatch.setattr("medctl.finetune.run.plot_curves", lambda *args: None)  # a second of matplotlib a run
    extra = ('model.head.kind="attentive"', "train.epochs=3", "train.patience=0")
    grid_args = probe_args(synthetic_3d, tmp_path, "tokens", *extra, "train.grid={lr_head=[0.001, 0.01]}")
    result = run_finetune(load_config(grid_args[1], grid_args[2:], env={}))
    results = json.loads(result.results_path.read_text())
    assert result.feature_cache and len(results["grid"]) == 2
    for point in results["grid"]:
        args = probe_args(synthetic_3d, tmp_path, f"tokens_{point['lr_head']}", *extra, f"train.lr_head={point['lr_head']}")
        single = run_finetune(load_config(args[1], args[2:], env={}))
        assert point["train_loss"] == pytest.approx([row["train_loss"] for row in single.history], rel=1e-4)
        assert point["best_epoch"] == single.best_epoch


def test_stacked_adamw_steps_each_member_as_torch_adamw_with_its_own_clipping_and_stops():
    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))
    lrs, decays = [1e-3, 1e-2, 1e-1], [0.0, 0.1, 0.5]
    stacked = Stacked(template, 3)
    optimizer = StackedAdamW(stacked, lrs, decays, max_norm=0.5)
    references = [torch.nn.Sequential(*(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))) for _ in lrs]
    reference_optimizers = []
    for ref, lr, wd in zip(references, lrs, decays, strict=True):
        ref.load_state_dict(template.state_dict())
        groups = [
            {"params": [p for n, p in ref.named_parameters() if n.endswith("weight")], "weight_decay": wd},
            {"params": [p for n, p in ref.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
        ]
        reference_optimizers.append(torch.optim.AdamW(groups, lr=lr))
    for step in range(6):
        x, y = torch.randn(8, 5) * 3, torch.randint(0, 3, (8,))
        if step == 4:
            optimizer.active[1] = False  # member 1 stopped: it stays as it is
        losses = torch.nn.functional.cross_entropy(stacked(x).flatten(0, 1), y.repeat_interleave(3), reduction="none")
        optimizer.zero_grad()
        losses.view(8, 3).mean(0).sum().backward()
        optimizer.step()
        for g, (ref, opt) in enumerate(zip(references, reference_optimizers, strict=True)):
            if step >= 4 and g == 1:
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            opt.step()
    for g, ref in enumerate(references):
        state = stacked.member_state(g)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4)


def test_stacked_attentive_heads_with_dropout_train_as_separate_heads_do():
    """The member axis through the attentive pooler (vmap), dropout drawing the single head's mask."""
    torch.manual_seed(0)
    template = ProbeHeads(torch.nn.ModuleDict({"label": build_head("attentive", 16, 3, dropout=0.3)}))
    lrs, decays = [1e-3, 3e-2], [1e-4, 1e-2]
    stacked = Stacked(template, 2)
    optimizer = StackedAdamW(stacked, lrs, decays, max_norm=1.0)
    singles = [copy.deepcopy(template) for _ in lrs]
    single_optimizers = [
        torch.optim.AdamW(param_groups_with_decay(head, lr, wd), lr=lr) for head, lr, wd in zip(singles, lrs, decays, strict=True)
    ]
    for _ in range(4):
        tokens, labels = torch.randn(6, 9, 16), torch.randint(0, 3, (6,))  # (B, T, D), (B,)
        rng = torch.get_rng_state()
        logits = stacked(tokens)["label"]  # (B, G, K)
        losses = torch.stack([torch.nn.functional.cross_entropy(logits[:, g], labels) for g in range(2)])
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        for head, single_optimizer in zip(singles, single_optimizers, strict=True):
            torch.set_rng_state(rng)  # the mask a single run would draw at this step
            single_optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(tokens)["label"], labels).backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            single_optimizer.step()
    for g, head in enumerate(singles):
        state = stacked.member_state(g)
        for name, value in head.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-5, rtol=1e-4)


def test_a_selected_point_on_the_edge_names_it_and_weight_decay_zero_is_a_floor(caplog):
    caplog.set_level("INFO", logger="medctl")
    points = [GridPoint(lr, wd) for lr in (1e-3, 1e-2, 1e-1) for wd in (0.0, 1e-2)]
    assert edge_warning(points, 2) == ""  # lr 1e-2, wd 0: inside on lr, at the floor on wd
    line = edge_warning(points, 5)  # lr 1e-1, wd 1e-2
    assert "largest lr_head (0.1): widen train.grid.lr_head upwards" in line
    assert "largest weight_decay (0.01)" in line
    assert edge_warning(points, 0).count("smallest lr_head (0.001)") == 1
    logged = [r.message for r in caplog.records if r.message.startswith("warning: grid")]
    assert len(logged) == 2


def test_grid_keys_are_checked_and_a_fine_tune_grid_is_one_line(synthetic_3d, tmp_path):
    out = invoke("finetune", *probe_args(synthetic_3d, tmp_path, "typo", "train.grid={lr_heads=[0.01]}"))
    assert "unknown key `train.grid.lr_heads`; did you mean `train.grid.lr_head`?" in one_error_line(out)
    out = invoke("finetune", *probe_args(synthetic_3d, tmp_path, "neg", "train.grid={weight_decay=[-1.0]}"))
    assert "`train.grid.weight_decay.0` = -1.0" in one_error_line(out)
    out = invoke("finetune", *probe_args(synthetic_3d, tmp_path, "ft", GRID_3x2, "model.freeze_encoder=false"))
    assert "set train.grid = {} for a fine-tune" in one_error_line(out)
