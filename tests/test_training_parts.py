"""The loop's parts on their own: lr schedule, param groups, EMA, RNG snapshots, state files, early
stopping, precision, loaders, metrics logger."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from medctl.errors import CheckpointError, ConfigError
from medctl.training import precision
from medctl.training.distributed import all_reduce_mean, is_rank0, make_loader, unwrap, world_size, wrap_ddp
from medctl.training.early_stopping import EarlyStopping
from medctl.training.ema import ema_update
from medctl.training.logging import MetricsLogger, read_metrics
from medctl.training.optim import (
    build_optimizer,
    build_scheduler,
    ema_initial_share,
    get_lr,
    momentum_schedule,
    param_groups_with_decay,
)
from medctl.training.seed import restore_rng_state, rng_state, set_seed
from medctl.training.state import atomic_torch_save, load_train_state, save_train_state


# --------------------------------------------------------------------------------------------- get_lr
def test_get_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [get_lr(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert get_lr(4, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert get_lr(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: the mean of peak and floor
    assert get_lr(14, **kw) == pytest.approx(0.1) and get_lr(100, **kw) == pytest.approx(0.1)
    cosine = [get_lr(s, **kw) for s in range(4, 15)]
    assert cosine == sorted(cosine, reverse=True)
    for s in range(4, 15):  # the formula, written out
        progress = (s - 4) / 10
        assert get_lr(s, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_get_lr_is_pure_and_without_warmup_starts_at_the_peak():
    first = [get_lr(s, base_lr=3e-4, warmup_steps=0, total_steps=10) for s in range(12)]
    again = [get_lr(s, base_lr=3e-4, warmup_steps=0, total_steps=10) for s in reversed(range(12))][::-1]
    assert first == again
    assert first[0] == pytest.approx(3e-4) and first[10] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="total_steps"):
        get_lr(0, base_lr=1.0, warmup_steps=0, total_steps=0)


def test_scheduler_scales_every_group_by_the_same_factor_and_saves_weights_only(tmp_path):
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}], weight_decay=0.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=8)
    for step in range(8):
        factor = get_lr(step, base_lr=1.0, warmup_steps=2, total_steps=8)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-5 * factor)
        optimizer.step()
        scheduler.step()
    atomic_torch_save(scheduler.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["last_epoch"] == 8


def test_a_warmup_as_long_as_the_run_is_shortened(caplog):
    optimizer = build_optimizer([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}], 0.0)
    with caplog.at_level("INFO", logger="medctl"):
        scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=6)
    assert "warmup" in caplog.text
    assert scheduler.lr_lambdas[0].warmup_steps == 3


def test_param_groups_keep_norms_biases_and_no_weight_decay_names_out_of_decay():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 8, 4))
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def no_weight_decay(self):
            return {"pos_embed"}

    net = Net()
    groups = param_groups_with_decay(net, lr=0.1, weight_decay=0.05, name="encoder")
    by_name = {g["name"]: g for g in groups}
    assert (
        by_name["encoder.decay"]["weight_decay"] == 0.05
        and by_name["encoder.no_decay"]["weight_decay"] == 0.0
    )
    decay_ids = {id(p) for p in by_name["encoder.decay"]["params"]}
    assert decay_ids == {id(net.conv.weight), id(net.frozen.weight)}
    assert id(net.pos_embed) in {id(p) for p in by_name["encoder.no_decay"]["params"]}
    trainable = param_groups_with_decay(net, lr=0.1, weight_decay=0.05, include_frozen=False)
    assert id(net.frozen.weight) not in {id(p) for g in trainable for p in g["params"]}
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], 0.0)


def test_momentum_schedule_rises_along_a_cosine():
    values = [momentum_schedule(s, 10, 0.99, 1.0) for s in range(12)]
    assert (
        values[0] == pytest.approx(0.99)
        and values[10] == pytest.approx(1.0)
        and values[11] == pytest.approx(1.0)
    )
    assert values[5] == pytest.approx(0.995)
    assert values == sorted(values)


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_initial_share_is_what_a_target_keeps_of_its_start_while_the_online_net_stands_still():
    torch.manual_seed(0)
    start, online = nn.Linear(4, 4), nn.Linear(4, 4)
    target = copy.deepcopy(start)
    steps = 24
    for step in range(steps):
        ema_update(target, online, momentum_schedule(step, steps, 0.9, 1.0))
    share = ema_initial_share(steps, 0.9, 1.0)
    # target = share * start + (1 - share) * online, parameter by parameter
    for t, a, b in zip(target.parameters(), start.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, share * a + (1 - share) * b)
    assert ema_initial_share(steps, 0.99, 1.0) > 0.88 and ema_initial_share(steps, 0.99, 0.99) == pytest.approx(0.99**24)
    assert ema_initial_share(steps, 1.0, 1.0) == 1.0 and ema_initial_share(steps, 0.0, 1.0) == 0.0


def test_ema_update_is_the_weighted_average_and_copies_buffers():
    torch.manual_seed(0)
    online, target = (
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
    )
    online[1].running_mean.fill_(2.0)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for old, new, source in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * source)
    assert torch.equal(target[1].running_mean, online[1].running_mean)
    ema_update(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters(), strict=True))
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, 1.5)
    with pytest.raises(ValueError, match="copy of the online"):
        ema_update(nn.Linear(3, 3), online, 0.5)


# ------------------------------------------------------------------------------------------- RNG, state
def test_rng_snapshot_restores_python_numpy_and_torch_and_saves_weights_only(tmp_path):
    set_seed(7)
    snapshot = rng_state()
    atomic_torch_save(snapshot, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.random(), np.random.rand(3), torch.rand(5)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_set_seed_makes_runs_repeat():
    set_seed(3)
    first = (random.random(), np.random.rand(), torch.randn(2).tolist())
    set_seed(3)
    assert (random.random(), np.random.rand(), torch.randn(2).tolist()) == first


class Arbitrary:
    """Not a tensor or a plain value: a weights-only load must refuse it."""


def make_state(tmp_path):
    torch.manual_seed(0)
    model, head = nn.Linear(4, 2), nn.Linear(2, 1)
    optimizer = build_optimizer(
        param_groups_with_decay(model, 0.1, 0.01) + param_groups_with_decay(head, 0.1, 0.01), 0.01
    )
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    head(model(torch.randn(3, 4))).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "last.ckpt"
    save_train_state(
        path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        epoch=3,
        step=12,
        best={"epoch": 2, "metric": 0.75, "monitor": "auc"},
        extra_modules={"head": head},
        extra={"history": [{"a": 1.0}]},
    )
    return path, model, head, optimizer, scheduler


def test_train_state_round_trips_through_weights_only_load(tmp_path):
    path, model, head, optimizer, scheduler = make_state(tmp_path)
    payload = torch.load(path, weights_only=True)
    assert payload["medctl"] == {"format": 1, "kind": "train_state", "version": payload["medctl"]["version"]}
    expected_next = torch.rand(3)

    torch.manual_seed(99)
    model2, head2 = nn.Linear(4, 2), nn.Linear(2, 1)
    optimizer2 = build_optimizer(
        param_groups_with_decay(model2, 0.1, 0.01) + param_groups_with_decay(head2, 0.1, 0.01), 0.01
    )
    scheduler2 = build_scheduler(optimizer2, warmup_steps=1, total_steps=10)
    state = load_train_state(
        path, model=model2, optimizer=optimizer2, scheduler=scheduler2, extra_modules={"head": head2}
    )
    assert (state.epoch, state.step, state.best["metric"], state.extra["history"]) == (
        3,
        12,
        0.75,
        [{"a": 1.0}],
    )
    assert torch.equal(model2.weight, model.weight) and torch.equal(head2.weight, head.weight)
    assert scheduler2.last_epoch == scheduler.last_epoch
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(
        optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected_next)  # the RNG is where it was when saved


def test_bad_train_states_are_refused_naming_the_file(tmp_path):
    path, *_ = make_state(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_train_state(path, model=nn.Linear(5, 2))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        load_train_state(truncated, model=nn.Linear(4, 2))
    encoder_ckpt = tmp_path / "encoder.ckpt"
    torch.save({"medctl": {"format": 1, "kind": "encoder"}, "state_dict": {}}, encoder_ckpt)
    with pytest.raises(CheckpointError, match="not a training state"):
        load_train_state(encoder_ckpt, model=nn.Linear(4, 2))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"medctl": {"kind": "train_state"}, "obj": Arbitrary()}, unsafe)
    with pytest.raises(CheckpointError, match="refused"):
        load_train_state(unsafe, model=nn.Linear(4, 2))


# ------------------------------------------------------------------------------------- early stopping
def test_early_stopping_infers_the_direction_and_counts_patience():
    assert EarlyStopping("val_loss").mode == "min" and EarlyStopping("balanced_accuracy").mode == "max"
    stopper = EarlyStopping("auc", patience=2)
    assert [stopper.update(v) for v in (0.5, 0.7, 0.7, float("nan"))] == [True, True, False, False]
    assert stopper.should_stop and stopper.best == 0.7
    resumed = EarlyStopping("auc", patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.should_stop and resumed.best == 0.7
    never = EarlyStopping("loss", patience=0)
    assert [never.update(v) for v in (1.0, 2.0, 3.0, 0.5)] == [
        True,
        False,
        False,
        True,
    ] and not never.should_stop
    with pytest.raises(ValueError, match="same train.monitor"):
        EarlyStopping("loss").load_state_dict(stopper.state_dict())
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping("auc", mode="up")


# ------------------------------------------------------------------------------------------ precision
def test_bf16_on_cpu_falls_back_to_fp32_with_a_note(caplog):
    with caplog.at_level("INFO", logger="medctl"):
        precision._note_fp32_fallback.cache_clear()
        assert precision.effective_precision("cpu", "bf16") == "fp32"
        with precision.autocast_context("cpu", "bf16"):
            out = nn.Linear(2, 2)(torch.ones(1, 2))
    assert out.dtype == torch.float32 and "training in fp32" in caplog.text
    with pytest.raises(ConfigError, match="precision"):
        precision.autocast_context("cpu", "fp16")


def test_resolve_device():
    assert precision.resolve_device("cpu") == torch.device("cpu")
    assert precision.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="run.device"):
        precision.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            precision.resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda():
    layer = nn.Linear(4, 4).cuda()
    with precision.autocast_context("cuda", "bf16"):
        assert layer(torch.ones(2, 4, device="cuda")).dtype == torch.bfloat16
    optimizer = build_optimizer(param_groups_with_decay(layer, 1e-3, 0.0), 0.0)
    assert optimizer.defaults["fused"]


# --------------------------------------------------------------------------------- loaders and logging
def test_single_process_helpers_and_a_loader_whose_order_depends_on_seed_and_epoch():
    assert is_rank0() and world_size() == 1
    model = nn.Linear(2, 2)
    assert wrap_ddp(model) is model and unwrap(model) is model
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_mean(value), value)

    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    loader = make_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=1, drop_last=True)

    def order(epoch):
        loader.sampler.set_epoch(epoch)
        return torch.cat([b[0] for b in loader]).tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(2)) == list(range(20))
    torch.rand(100)  # the global RNG does not change the order
    assert order(1) == order(1)


def test_metrics_logger_writes_rows_and_rewinds(tmp_path):
    with MetricsLogger(tmp_path, enabled=True) as logger:
        for epoch in range(3):
            logger.log(
                "train",
                {"loss": torch.tensor(1.0 / (epoch + 1)), "lr": 0.1},
                epoch=epoch,
                step=10 * (epoch + 1),
            )
        logger.rewind(epoch=1, step=10)
        logger.log("train", {"loss": 0.4}, epoch=1, step=20)
    rows = read_metrics(tmp_path, "train")
    assert [(r["epoch"], r["loss"]) for r in rows] == [(0, 1.0), (1, 0.4)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"time": 1.0, "phase": "train", "epo')  # a crash in the middle of a row
    assert len(read_metrics(tmp_path)) == 2
    quiet = MetricsLogger(tmp_path / "other", enabled=False)
    quiet.log("train", {"loss": 1.0}, epoch=0, step=1)
    assert not (tmp_path / "other").exists()
