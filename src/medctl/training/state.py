"""``train_state`` checkpoints: everything ``--resume`` needs, saved atomically, loaded weights-only.

Layout (tensors and plain values only, so ``torch.load(weights_only=True)`` reads it)::

    {"medctl": {"format": 1, "kind": "train_state", "version": str},
     "state_dict": model weights (DDP/compile wrappers removed),
     "optimizer": ..., "scheduler": ... | None, "scaler": ... | None,
     "extra_modules": {name: state_dict},          # e.g. BYOL target network, predictor
     "epoch": last finished epoch (0-based), "step": optimizer steps done,
     "best": {...}, "rng": [rng_state() of rank 0, rank 1, ...], "extra": {...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medctl import __version__
from medctl.errors import CheckpointError
from medctl.io import atomic_write
from medctl.models.checkpoints import read_checkpoint
from medctl.training.distributed import rank, unwrap
from medctl.training.seed import restore_rng_state, rng_state

FORMAT = 1


@dataclass
class TrainState:
    """What :func:`load_train_state` restored besides the objects it loaded in place."""

    epoch: int
    step: int
    best: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`medctl.io.atomic_write`: a crash leaves the previous file untouched."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def save_train_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int,
    step: int,
    best: Mapping[str, Any] | None = None,
    extra_modules: Mapping[str, nn.Module] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write a ``train_state`` checkpoint atomically (see the module docstring for the layout).

    ``rng_states`` is one :func:`~medctl.training.seed.rng_state` per rank (default: this process's).
    ``best`` and ``extra`` must hold only tensors and plain values (numbers, strings, lists, dicts, None).
    """
    payload = {
        "medctl": {"format": FORMAT, "kind": "train_state", "version": __version__},
        "state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra_modules": {name: unwrap(m).state_dict() for name, m in (extra_modules or {}).items()},
        "epoch": int(epoch),
        "step": int(step),
        "best": dict(best or {}),
        "rng": rng_states if rng_states is not None else [rng_state()],
        "extra": dict(extra or {}),
    }
    atomic_torch_save(payload, path)


def read_train_state(path: str | Path) -> dict[str, Any]:
    """Load a ``train_state`` checkpoint weights-only onto the CPU; CheckpointError naming the file.

    Read by :func:`medctl.models.checkpoints.read_checkpoint`, so a damaged or hostile ``last.ckpt`` gets
    the same one line as any other checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no training state to resume from; run without --resume to start afresh"
        )
    payload = read_checkpoint(path)  # weights only; empty, corrupt and pickled files are one clean line
    header = payload.get("medctl") if isinstance(payload, dict) else None
    if not isinstance(header, dict) or header.get("kind") != "train_state":
        kind = header.get("kind") if isinstance(header, dict) else "not a medctl checkpoint"
        raise CheckpointError(
            f"{path}: is {kind}, not a training state (checkpoints/last.ckpt); pick last.ckpt"
        )
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: training-state format {header.get('format')}, this medctl reads {FORMAT}"
        )
    return payload


def load_train_state(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra_modules: Mapping[str, nn.Module] | None = None,
    restore_rng: bool = True,
) -> TrainState:
    """Restore model, optimizer, scheduler, scaler, extra modules and RNG in place from ``path``.

    Each rank restores its own RNG snapshot when the checkpoint has one for it, else rank 0's.
    """
    payload = read_train_state(path)
    _load_module(unwrap(model), payload["state_dict"], path, "model")
    for name, module in (extra_modules or {}).items():
        states = payload["extra_modules"]
        if name not in states:
            raise CheckpointError(
                f"{path}: has no `{name}` module to restore (it has {sorted(states)}); same method?"
            )
        _load_module(unwrap(module), states[name], path, name)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None and payload["scheduler"] is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload["scaler"] is not None:
            scaler.load_state_dict(payload["scaler"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: optimizer/scheduler state does not fit this run ({exc}); resume with the same config"
        ) from None
    if restore_rng:
        states = payload["rng"]
        restore_rng_state(states[rank()] if rank() < len(states) else states[0])
    return TrainState(
        epoch=payload["epoch"], step=payload["step"], best=payload["best"], extra=payload["extra"]
    )


def _load_module(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"{path}: the saved {what} does not fit this one ({detail}); resume with the same config"
        ) from None
