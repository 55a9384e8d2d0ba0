"""fit under torchrun-style DDP: two CPU processes (gloo); slow because each process imports torch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        MEDCTL_NO_PROGRESS="1",
    )
    from torch import nn
    from torch.utils.data import TensorDataset

    from medctl.training.distributed import (
        cleanup_distributed,
        init_distributed,
        make_loader,
        world_size,
        wrap_ddp,
    )
    from medctl.training.fit import fit
    from medctl.training.optim import build_optimizer, build_scheduler, param_groups_with_decay
    from medctl.training.seed import set_seed

    assert init_distributed() and world_size() == world
    set_seed(0)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    x = torch.randn(32, 3)
    y = x.sum(dim=1, keepdim=True)
    model = wrap_ddp(nn.Linear(3, 1))
    optimizer = build_optimizer(param_groups_with_decay(model, 0.05, 0.0), 0.0)
    loader = make_loader(
        TensorDataset(x, y), batch_size=4, shuffle=True, num_workers=0, seed=0, drop_last=True
    )
    assert len(loader) == 4  # each rank reads half of the 32 samples
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=3 * len(loader))

    def step(model, batch, index):
        return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1])}

    def evaluate(epoch):
        with torch.no_grad():
            return {"loss": nn.functional.mse_loss(model(x), y).item()}

    result = fit(
        model=model,
        train_step=step,
        train_loader=loader,
        optimizer=optimizer,
        scheduler=scheduler,
        epochs=3,
        run_dir=run_dir,
        device="cpu",
        evaluate=evaluate,
        monitor="loss",
    )
    weights = model.module.weight.detach().clone()
    torch.save({"weights": weights, "history": result.history}, os.path.join(run_dir, f"rank{rank}.pt"))
    cleanup_distributed()


@pytest.mark.slow
def test_fit_under_ddp_keeps_ranks_in_step_and_writes_once(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0["weights"], rank1["weights"])  # gradients were averaged
    assert [row["train_loss"] for row in rank0["history"]] == [row["train_loss"] for row in rank1["history"]]
    assert rank0["history"][-1]["train_loss"] < rank0["history"][0]["train_loss"]
    payload = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(payload["rng"]) == 2 and payload["epoch"] == 2  # one RNG snapshot per rank
    assert (
        len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
    )  # rank 0 alone wrote 3 train + 3 val
