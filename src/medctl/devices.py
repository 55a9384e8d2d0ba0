"""Which torch device a run uses: the one resolver of ``run.device`` for every stage and check.

It sits at the bottom of the package (it needs only torch and the error family), so a library such as
``models`` can resolve a device without importing ``training``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medctl.errors import ConfigError


def resolve_device(spec: str | torch.device) -> torch.device:
    """``run.device`` -> a torch device: ``auto`` is CUDA when visible (the local rank's under torchrun).
    The one resolver of every stage: an unknown or unavailable device is a one-line ConfigError."""
    spec = str(spec).strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            [f"`run.device` = {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps"]
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                [f"`run.device` = {spec!r} but no CUDA device is visible; use run.device=auto or cpu"]
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                [f"`run.device` = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"]
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError([f"`run.device` = {spec!r} but MPS is not available; use run.device=cpu"])
    return device


def available_memory() -> int:
    """Bytes of RAM available now: ``MemAvailable``, else the free pages, else 8 GiB (unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
