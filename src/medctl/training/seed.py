"""Seeding and RNG snapshots.

:func:`rng_state` captures the python, numpy (legacy global ``np.random``) and torch (CPU + every CUDA
device) generators as tensors and plain values, so the snapshot saves inside a checkpoint that loads
with ``torch.load(weights_only=True)``. Generators a caller creates itself (``np.random.default_rng``,
``torch.Generator``, MONAI's per-transform ``RandomState``) are not global and are not captured.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); ``deterministic`` also pins cuDNN/cuBLAS algorithms.

    Under torchrun, seed each rank differently where samples should differ (``seed + rank``).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # an op without a deterministic kernel warns (warn_only) each call; list each such op once
        warnings.filterwarnings("once", message=r".*does not have a deterministic implementation.*")


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy's global RNGs in a worker from the seed torch
    gave it (drawn from the seeded global torch RNG), so worker-side augmentations are reproducible."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def rng_state() -> dict[str, Any]:
    """A snapshot of every global RNG, as tensors and plain values (``weights_only``-safe)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a snapshot from :func:`rng_state`; CUDA states are restored for the devices present."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[index].cpu(), index)
