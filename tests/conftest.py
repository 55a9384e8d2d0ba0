"""Shared fixtures: a seed, and no stray MEDCTL_* or AWS variables leaking in from the shell."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MEDCTL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDCTL_NO_PROGRESS", "1")


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    np.random.seed(0)
    return 0
