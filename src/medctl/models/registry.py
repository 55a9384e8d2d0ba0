"""The one explicit registry of encoders: name -> builder and what the user needs to know to pick one.

``medctl list models`` reads :data:`ENCODERS`; every stage builds its encoder with :func:`build_encoder`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from medctl.errors import ConfigError
from medctl.models.encoders import convnext_cbam, mt3, resnet, unet2d, vit3d
from medctl.models.encoders.base import Encoder


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its builder, family, input kind and the input sizes it takes."""

    builder: Callable[..., Encoder]
    family: str
    spatial_dims: int  # 2: images (C, H, W); 3: volumes (C, D, H, W)
    default_input_size: tuple[int, ...]  # what `medctl list models` measures and the builder assumes
    size_rule: str  # which input sizes work
    description: str
    for_tests: bool = False

    @property
    def input_kind(self) -> str:
        return "3D volume (C, D, H, W)" if self.spatial_dims == 3 else "2D image (C, H, W)"


def _vit(builder: Callable[..., Encoder], description: str, for_tests: bool = False) -> EncoderSpec:
    if for_tests:
        return EncoderSpec(builder, "vit3d", 3, (8, 32, 32), "multiples of 2x8x8", description, True)
    return EncoderSpec(builder, "vit3d", 3, (16, 224, 224), "multiples of 2x16x16", description)


def _resnet(builder: Callable[..., Encoder], dims: int, description: str, for_tests: bool = False) -> EncoderSpec:
    size = (32, 64, 64) if dims == 3 else (224, 224)
    return EncoderSpec(builder, "resnet (MONAI)", dims, size, "any", description, for_tests)


ENCODERS: dict[str, EncoderSpec] = {
    "mt3": EncoderSpec(mt3.mt3, "mt3", 3, (32, 64, 64), "any", "CNN3D stem, multi-plane projector, transformer"),
    "mt3_tiny": EncoderSpec(mt3.mt3_tiny, "mt3", 3, (16, 32, 32), "any", "mt3 for tests and the demo", True),
    "vit3d": _vit(vit3d.vit3d, "any width/depth/heads via encoder_args (what encoder = \"auto\" builds off-size)"),
    "vit3d_test": _vit(vit3d.vit3d_test, "64 wide, 2 deep, 2x8x8 tubelets", for_tests=True),
    "vit3d_tiny": _vit(vit3d.vit3d_tiny, "V-JEPA 2 layout, 192 wide, 12 deep"),
    "vit3d_small": _vit(vit3d.vit3d_small, "V-JEPA 2 layout, 384 wide, 12 deep"),
    "vit3d_base": _vit(vit3d.vit3d_base, "V-JEPA 2 layout, 768 wide, 12 deep"),
    "vit3d_large": _vit(vit3d.vit3d_large, "V-JEPA 2 ViT-L, 1024 wide, 24 deep"),
    "vit3d_huge": _vit(vit3d.vit3d_huge, "V-JEPA 2 ViT-H, 1280 wide, 32 deep"),
    "vit3d_giant": _vit(vit3d.vit3d_giant, "V-JEPA 2 ViT-g (released), 1408 wide, 40 deep, 22 heads"),
    "vit3d_giant_h16": _vit(vit3d.vit3d_giant_h16, "ViT-g with 16 heads (V-JEPA 2 `vit_giant`)"),
    "unet2d": EncoderSpec(
        unet2d.unet2d, "unet2d", 2, (192, 96), "multiples of 8", "depth 4, base 16, 128-channel bottleneck; decoder"
    ),
    "unet2d_tiny": EncoderSpec(unet2d.unet2d_tiny, "unet2d", 2, (32, 16), "multiples of 8", "unet2d, base 4", True),
    "convnext_tiny_cbam": EncoderSpec(
        convnext_cbam.convnext_tiny_cbam, "convnext", 2, (224, 224), "multiples of 32", "ConvNeXt-T, CBAM at stages 3-4"
    ),
    "convnext_test_cbam": EncoderSpec(
        convnext_cbam.convnext_test_cbam, "convnext", 2, (64, 64), "multiples of 32", "depths 1,1,2,1, dims 16..64", True
    ),
    "resnet10_2d": _resnet(resnet.resnet10_2d, 2, "MONAI resnet10"),
    "resnet18_2d": _resnet(resnet.resnet18_2d, 2, "MONAI resnet18"),
    "resnet34_2d": _resnet(resnet.resnet34_2d, 2, "MONAI resnet34"),
    "resnet50_2d": _resnet(resnet.resnet50_2d, 2, "MONAI resnet50"),
    "resnet_test_2d": _resnet(resnet.resnet_test_2d, 2, "resnet10 at 1/8 width", for_tests=True),
    "resnet10_3d": _resnet(resnet.resnet10_3d, 3, "MONAI resnet10 (MedicalNet layout)"),
    "resnet18_3d": _resnet(resnet.resnet18_3d, 3, "MONAI resnet18 (MedicalNet layout)"),
    "resnet34_3d": _resnet(resnet.resnet34_3d, 3, "MONAI resnet34 (MedicalNet layout)"),
    "resnet50_3d": _resnet(resnet.resnet50_3d, 3, "MONAI resnet50 (MedicalNet layout)"),
    "resnet_test_3d": _resnet(resnet.resnet_test_3d, 3, "resnet10 at 1/8 width", for_tests=True),
}


def get_spec(name: str) -> EncoderSpec:
    """The spec of ``name``; an unknown name is a ConfigError naming the closest registered one."""
    if name in ENCODERS:
        return ENCODERS[name]
    close = difflib.get_close_matches(name, list(ENCODERS), n=1, cutoff=0.5)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise ConfigError([f"unknown encoder `{name}`; {hint}see `medctl list models`"], "model.encoder")


def build_encoder(name: str, *, in_channels: int = 1, input_size: Sequence[int], **encoder_args: Any) -> Encoder:
    """Build a registered encoder for ``in_channels`` and an input of ``input_size`` ((D, H, W) or (H, W)).

    ``encoder_args`` go to the builder (e.g. ``pos_embed="rope"``); a name it does not take is a
    ConfigError naming ``model.encoder_args``. The encoder gets ``.name`` and ``.build_args`` (what
    rebuilds it: in_channels, input_size and the encoder args), which checkpoints record.
    """
    spec = get_spec(name)
    try:
        encoder = spec.builder(in_channels=in_channels, input_size=tuple(input_size), **encoder_args)
    except TypeError as exc:
        if "keyword argument" not in str(exc):
            raise
        raise ConfigError([f"{name} does not take these encoder args ({exc}); check the names"], "model.encoder_args") from None
    encoder.name = name
    encoder.build_args = {"in_channels": in_channels, "input_size": list(input_size), **encoder_args}
    return encoder


@cache
def default_variant(name: str) -> tuple[int, int, str]:
    """(embed_dim, trainable parameters, feature layout) of ``name`` built with its defaults on the meta
    device: no memory, no initialisation cost worth the name."""
    spec = get_spec(name)
    with torch.device("meta"):
        encoder = spec.builder(in_channels=1, input_size=spec.default_input_size)
    return encoder.embed_dim, sum(p.numel() for p in encoder.parameters()), encoder.feature_layout


def parameter_count(name: str) -> int:
    """Trainable parameters of ``name``'s default variant (one input channel)."""
    return default_variant(name)[1]


def describe_encoders(include_tests: bool = True) -> list[dict[str, Any]]:
    """One row per registered encoder for ``medctl list models``."""
    rows = []
    for name, spec in ENCODERS.items():
        if spec.for_tests and not include_tests:
            continue
        embed_dim, params, layout = default_variant(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "dims": f"{spec.spatial_dims}D",
                "input": spec.input_kind,
                "size": f"{spec.size_rule} (default {'x'.join(map(str, spec.default_input_size))})",
                "embed_dim": embed_dim,
                "params": params,
                "layout": layout,
                "description": spec.description,
                "for_tests": spec.for_tests,
            }
        )
    return rows
