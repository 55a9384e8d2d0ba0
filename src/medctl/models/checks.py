"""``medctl check checkpoint``: which encoder this checkpoint needs, will it load into the configured one, and does it run?"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medctl.config import ModelConfig
from medctl.devices import resolve_device
from medctl.models.architecture import Architecture, describe_encoder, plan_model_encoder, read_architecture
from medctl.models.checkpoints import LoadReport
from medctl.models.registry import get_spec


@dataclass
class CheckpointReport:
    """The load report, and (when the load may go ahead) one forward pass at the configured size."""

    path: str
    encoder: str  # the registry name built
    load: LoadReport
    refused: str = ""  # why the load was refused; "" when it went ahead
    input_shape: tuple[int, ...] = ()
    embedding_shape: tuple[int, ...] = ()
    feature_shape: tuple[int, ...] = ()
    parameters: int = 0
    seconds: float = 0.0  # one forward pass, batch 1
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    architecture: Architecture | None = None  # what the file holds, as read from it
    description: str = ""  # the built encoder in one line

    @property
    def ok(self) -> bool:
        return not self.refused


def check_checkpoint(
    path: str | Path, model: ModelConfig, spatial_size: Sequence[int], device: str = "auto"
) -> CheckpointReport:
    """Build ``model.encoder`` (``auto``: what ``path`` holds) for ``spatial_size``
    (``data.preprocess.spatial_size``) and ``model.in_channels``, plan the load of ``path``, and unless
    refused load it and time one forward pass of a (1, C, *spatial_size) tensor on ``device`` (``run.device``).

    Unreadable files (unsafe pickles, truncated files) and unreadable architectures raise
    CheckpointError; a load that ``model.allow_partial_load`` does not allow comes back as ``report.refused``.
    """
    model = model.model_copy(update={"checkpoint": str(path)})
    notes = []
    input_size = tuple(spatial_size)
    if not input_size:
        name = read_architecture(path, model.checkpoint_key).name if model.encoder == "auto" else model.encoder
        input_size = get_spec(name).default_input_size
        notes.append(f"data.preprocess.spatial_size is empty (sizes kept); checked at {list(input_size)}")
    built, to_load, refused = plan_model_encoder(
        model, in_channels=model.in_channels, input_size=input_size, spatial_dims=len(input_size)
    )
    encoder, load = built.encoder, built.report
    report = CheckpointReport(str(path), encoder.name, load, refused, notes=notes + built.choice.notes)
    report.architecture = built.choice.architecture
    report.description = describe_encoder(encoder)
    report.parameters = sum(p.numel() for p in encoder.parameters())
    if report.refused:
        return report
    encoder.load_state_dict(to_load, strict=False)

    torch_device = resolve_device(device)
    encoder = encoder.to(torch_device).eval()
    x = torch.randn(1, encoder.in_channels, *input_size, device=torch_device)  # (1, C, *spatial)
    with torch.inference_mode():
        start = time.perf_counter()
        features = encoder.forward_features(x)
        embedding = encoder(x)
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        report.seconds = (time.perf_counter() - start) / 2
    if not torch.isfinite(embedding).all():
        report.notes.append("the embedding has NaN or Inf values: the weights or the input scale are off")
    report.input_shape, report.device = tuple(x.shape), str(torch_device)
    report.embedding_shape, report.feature_shape = tuple(embedding.shape), tuple(features.shape)
    return report
