"""Devices and mixed precision: bf16 autocast on CUDA, plain fp32 everywhere else."""

from __future__ import annotations

import contextlib
import functools
import os
from contextlib import AbstractContextManager

import torch

from medctl.errors import ConfigError
from medctl.progress import log

PRECISIONS = ("fp32", "bf16")


def resolve_device(spec: str) -> torch.device:
    """``run.device`` -> a torch device: ``auto`` is CUDA when visible (the local rank's under torchrun)."""
    spec = spec.strip().lower()
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
