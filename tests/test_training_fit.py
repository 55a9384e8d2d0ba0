"""The shared loop: learns, logs, stops early, resumes bit-identically, survives a crash mid-checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medctl.errors import CheckpointError, ConfigError, RunFailure
from medctl.training import state as state_module
from medctl.training.distributed import make_loader
from medctl.training.fit import fit, move_to_device
from medctl.training.logging import read_metrics
from medctl.training.optim import build_optimizer, build_scheduler, param_groups_with_decay
from medctl.training.seed import set_seed
from medctl.training.state import read_train_state

EPOCHS = 4


class Interrupt(Exception):
    """Stands in for a kill (SIGINT, preemption) in the middle of an epoch."""


def make_problem(seed: int = 0, epochs: int = EPOCHS) -> dict:
    """Linear regression with noise through a small MLP with dropout; everything built like a stage does."""
    set_seed(seed)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.randn(48, 4)  # (N, 4)
    y = (x @ weights + 0.1 * torch.randn(48))[:, None]  # (N, 1)
    x_val = torch.randn(16, 4)
    y_val = (x_val @ weights)[:, None]
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = build_optimizer(param_groups_with_decay(model, 3e-2, 1e-4), 1e-4)
    loader = make_loader(
        TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=0, seed=seed, drop_last=False
    )
    scheduler = build_scheduler(optimizer, warmup_steps=3, total_steps=epochs * len(loader))

    def train_step(model: nn.Module, batch, step: int) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        inputs = inputs + 0.01 * torch.randn_like(inputs)  # an augmentation that draws from the global RNG
        prediction = model(inputs)
        return {
            "loss": nn.functional.mse_loss(prediction, targets),
            "mae": (prediction - targets).abs().mean(),
        }

    def evaluate(epoch: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {"loss": nn.functional.mse_loss(model(x_val), y_val).item()}

    return dict(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=loader,
        train_step=train_step,
        evaluate=evaluate,
        steps_per_epoch=len(loader),
    )


def run(problem: dict, run_dir, **kwargs):
    args = dict(
        model=problem["model"],
        train_step=problem["train_step"],
        train_loader=problem["train_loader"],
        optimizer=problem["optimizer"],
        scheduler=problem["scheduler"],
        epochs=EPOCHS,
        run_dir=run_dir,
        device="cpu",
        evaluate=problem["evaluate"],
        monitor="loss",
    )
    return fit(**(args | kwargs))


def test_fit_lowers_the_loss_and_writes_metrics_tensorboard_and_checkpoints(tmp_path):
    problem = make_problem()
    exported = []
    result = run(
        problem, tmp_path, export_best=lambda epoch, record: exported.append((epoch, record["val_loss"]))
    )

    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.epochs_run == EPOCHS and not result.stopped_early
    val = [row["val_loss"] for row in result.history]
    assert result.best_epoch == val.index(min(val)) + 1 and result.best_metric == pytest.approx(min(val))
    # export_best fired exactly on the improving epochs
    running_best = [e for e in range(EPOCHS) if val[e] == min(val[: e + 1])]
    assert [epoch for epoch, _ in exported] == running_best

    train_rows = read_metrics(tmp_path, "train")
    assert [row["epoch"] for row in train_rows] == list(range(1, EPOCHS + 1))  # 1-based where users see it
    assert [row["loss"] for row in train_rows] == pytest.approx(losses)
    assert all(row["step"] == row["epoch"] * problem["steps_per_epoch"] for row in train_rows)
    assert {"lr", "mae", "grad_norm", "samples_per_s"} <= set(train_rows[0])
    assert [row["loss"] for row in read_metrics(tmp_path, "val")] == pytest.approx(val)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    payload = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert payload["medctl"]["kind"] == "train_state" and payload["epoch"] == EPOCHS - 1
    assert torch.equal(payload["state_dict"]["0.weight"], problem["model"][0].weight)


def test_the_scheduler_drives_the_lr_per_step(tmp_path):
    problem = make_problem()
    result = run(problem, tmp_path, evaluate=None, monitor=None)
    lrs = [row["lr"] for row in result.history]
    assert lrs == sorted(lrs, reverse=True)  # cosine decay after a 3-step warmup inside epoch 0
    assert problem["scheduler"].last_epoch == EPOCHS * problem["steps_per_epoch"]
    assert result.best_epoch == EPOCHS and result.best_metric is None  # no monitor: the latest is best


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    problem = make_problem()
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])
    result = run(
        problem, tmp_path, epochs=6, evaluate=lambda epoch: {"auc": next(scores)}, monitor="auc", patience=3
    )
    assert result.stopped_early and result.epochs_run == 5
    assert result.best_epoch == 2 and result.best_metric == pytest.approx(0.6)  # 1-based
    # resuming a run that stopped early trains no further
    again = run(
        make_problem(),
        tmp_path,
        epochs=6,
        evaluate=lambda epoch: {"auc": 1.0},
        monitor="auc",
        patience=3,
        resume=True,
    )
    assert again.stopped_early and again.epochs_run == 5


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(tmp_path):
    straight = make_problem()
    reference = run(straight, tmp_path / "straight")

    interrupted = make_problem()
    kill_at = 2 * interrupted["steps_per_epoch"] + 1  # inside the third epoch

    def after_step(step: int) -> None:
        if step == kill_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(interrupted, tmp_path / "resumed", after_step=after_step)
    assert read_train_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["epoch"] == 1

    fresh = make_problem()  # a new process: everything rebuilt from the config, then resumed
    resumed = run(fresh, tmp_path / "resumed", resume=True)

    for (name, expected), actual in zip(
        straight["model"].state_dict().items(), fresh["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    for expected, actual in zip(
        straight["optimizer"].state_dict()["state"].values(),
        fresh["optimizer"].state_dict()["state"].values(),
        strict=True,
    ):
        assert torch.equal(expected["exp_avg_sq"], actual["exp_avg_sq"])
    drop = ("samples_per_s", "epoch_time_s")
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed.history] == [
        {k: v for k, v in row.items() if k not in drop} for row in reference.history
    ]
    assert resumed.best_epoch == reference.best_epoch
    # the partial third epoch's rows were dropped: one row per epoch, in order
    assert [row["epoch"] for row in read_metrics(tmp_path / "resumed", "train")] == list(range(1, EPOCHS + 1))


def test_a_crash_while_writing_the_checkpoint_never_corrupts_last_ckpt(tmp_path, monkeypatch):
    problem = make_problem()
    run(problem, tmp_path, epochs=1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = last.read_bytes()

    def torn_write(obj, fh, *args, **kwargs):  # half the bytes reach the disk, then the process dies
        fh.write(good[: len(good) // 2])
        raise Interrupt

    monkeypatch.setattr(state_module.torch, "save", torn_write)
    with pytest.raises(Interrupt):
        run(make_problem(), tmp_path, epochs=2, resume=True, extend=True)
    monkeypatch.undo()
    assert last.read_bytes() == good
    assert read_train_state(last)["epoch"] == 0
    assert not list(last.parent.glob(".last.ckpt.tmp*"))

    def failed_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("medctl.io.os.replace", failed_rename)  # the one atomic writer
    with pytest.raises(OSError):
        run(make_problem(), tmp_path, epochs=2, resume=True, extend=True)
    monkeypatch.undo()
    assert read_train_state(last)["epoch"] == 0
    assert not list(last.parent.glob(".last.ckpt.tmp*"))

    result = run(make_problem(), tmp_path, epochs=2, resume=True, extend=True)  # and the run still resumes
    assert result.epochs_run == 2


def test_resume_without_a_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="last.ckpt"):
        run(make_problem(), tmp_path, resume=True)


def test_an_unknown_monitor_lists_the_metrics_there_are(tmp_path):
    with pytest.raises(ConfigError, match="balanced_accuracy.*val_loss"):
        run(make_problem(), tmp_path, monitor="balanced_accuracy")


def test_a_diverging_loss_stops_with_a_clear_message(tmp_path):
    problem = make_problem()

    def train_step(model, batch, step):
        return {"loss": model(batch[0]).sum() * float("nan")}

    with pytest.raises(RunFailure, match="loss is nan at epoch 1"):
        run(problem, tmp_path, train_step=train_step)


def test_max_steps_log_every_and_hooks(tmp_path):
    problem = make_problem()
    seen = {"epochs": [], "steps": []}
    result = run(
        problem,
        tmp_path,
        epochs=2,
        max_steps_per_epoch=2,
        log_every=1,
        start_epoch_hook=seen["epochs"].append,
        after_step=seen["steps"].append,
    )
    assert seen == {"epochs": [0, 1], "steps": [0, 1, 2, 3]}
    assert [row["step"] for row in result.history] == [2, 4]
    assert [row["step"] for row in read_metrics(tmp_path, "train_step")] == [1, 2, 3, 4]


def test_move_to_device_walks_nested_batches():
    batch = {"image": torch.zeros(2, 1), "labels": [torch.ones(2), "id"], "pair": (torch.ones(1), 3)}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["labels"][1] == "id" and isinstance(moved["pair"], tuple) and moved["pair"][1] == 3
    assert json.dumps({k: str(type(v)) for k, v in moved.items()})
