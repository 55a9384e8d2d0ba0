"""Devices and mixed precision: bf16 autocast on CUDA, plain fp32 everywhere else."""

from __future__ import annotations

import contextlib
import functools
import os
from contextlib import AbstractContextManager

import torch

from medctl.devices import resolve_device as resolve_device  # every stage imports it from here too
from medctl.errors import ConfigError
from medctl.progress import log

PRECISIONS = ("fp32", "bf16")


def set_threads(threads: int, num_workers: int = 0) -> int:
    """``torch.set_num_threads`` from ``run.threads``; returns the number set.

    ``threads > 0`` is taken as given. ``0`` (auto) gives this process the CPUs it may really use (its
    affinity mask and cgroup quota, which ``torch``'s own default of all physical cores ignores in a
    container), shared with the other processes of this machine under torchrun and minus one per
    DataLoader worker (each worker runs single-threaded), at least 1 and never more than torch's default.
    """
    if threads <= 0:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        threads = max(1, min(usable_cpus() // local - num_workers, _TORCH_DEFAULT_THREADS))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity mask is the limit
    return cpus


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at import, before medctl changes it


def effective_precision(device: torch.device | str, precision: str) -> str:
    """The precision actually used: bf16 only on a CUDA device that supports it, else fp32 (with a note)."""
    if precision not in PRECISIONS:
        raise ConfigError([f"`precision` = {precision!r}: use one of {', '.join(PRECISIONS)}"])
    device = torch.device(device)
    if precision == "bf16" and (device.type != "cuda" or not torch.cuda.is_bf16_supported()):
        _note_fp32_fallback(device.type)
        return "fp32"
    return precision


def autocast_context(device: torch.device | str, precision: str) -> AbstractContextManager:
    """A context for the forward pass: ``torch.autocast(cuda, bfloat16)`` for bf16 on CUDA, else a no-op."""
    device = torch.device(device)
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def _note_fp32_fallback(device_type: str) -> None:
    log(f"precision bf16 was asked for but {device_type} has no bf16 autocast here; training in fp32")
