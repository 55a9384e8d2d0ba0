"""Write the V-JEPA 2 / 2.1 golden fixtures in this folder by running facebookresearch/vjepa2's own model code.

NOT part of medctl and never imported by the tests: it needs upstream's checkout (and timm, einops) on
PYTHONPATH. How the fixtures in this folder were made (see README.md here)::

    git --git-dir <vjepa2 mirror> archive c2963a4 | tar -x -C /tmp/vjepa2   # V-JEPA 2.0: src/models
    # + app/vjepa_2_1/models/{vision_transformer,utils/modules}.py transcribed from upstream (README.md)
    PYTHONPATH=/tmp/vjepa2 python tests/data/vjepa2/make_fixtures.py

Each ``<name>.pt`` (``torch.load(weights_only=True)``) holds:

- ``state_dict``: the encoder's weights in ``app/vjepa/train.py``'s layout: upstream wraps the ViT in
  ``MultiSeqWrapper`` (``backbone.``) and DDP (``module.``), so keys read ``module.backbone.blocks.0...``;
- ``inputs``: a list of (1, C, D, H, W) float32 inputs; ``tokens``: upstream's output tokens for each;
- ``config``: the upstream constructor arguments (plain values), and ``upstream``: the source files' commits.

Weights are upstream's init, then overwritten with seeded noise of a trained model's scale, so that a
wrong RoPE frequency layout, a missing modality embedding or the wrong position scheme changes the tokens
by far more than the tolerance (the script checks that it does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from app.vjepa_2_1.models.vision_transformer import VisionTransformer as VisionTransformer21
from src.models.vision_transformer import VisionTransformer
from src.utils.wrappers import MultiSeqWrapper
from torch import nn

HERE = Path(__file__).parent
UPSTREAM = {
    "v2.0": "facebookresearch/vjepa2@c2963a47433ecca0ad4f06ec28bcfa8cb5b5cefb src/models/vision_transformer.py",
    "v2.1": "facebookresearch/vjepa2@be434e4621e78d7cb176ccbea23c136c2141a42f app/vjepa_2_1/models/vision_transformer.py "
    "(+ utils/modules.py @16de6c80c258eab97f0517f69399576f06568cb9)",
}
# 16 wide with one head: 16-channel heads, of which RoPE rotates 3 x 4 and passes 4 through
TINY_2_0 = dict(patch_size=8, tubelet_size=2, embed_dim=16, depth=2, num_heads=1, mlp_ratio=2.0, use_sdpa=True)
# 2.1 has norms for 4 hierarchical layers only at depths 12/24/40/48, and interpolate_rope (the hub's
# setting for every 2.1 release) is defined for patch 16 (or 14) only: 12 deep, 16-pixel patches
TINY_2_1 = dict(
    patch_size=16, tubelet_size=2, embed_dim=12, depth=12, num_heads=1, mlp_ratio=1.0, use_sdpa=True,
    use_rope=True, img_temporal_dim_size=1, interpolate_rope=True, modality_embedding=True,
)  # fmt: skip


def trained_scale(model: nn.Module, seed: int) -> None:
    """Seeded weights of a trained model's scale: sharp attention, non-trivial norms and biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":  # upstream's frozen sin-cos table stays as made
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "mod_embed" in name:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * (2.0 if "qkv" in name else 1.0))


def training_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """``encoder.state_dict()`` as app/vjepa/train.py saves it: MultiSeqWrapper inside DDP."""
    wrapped = MultiSeqWrapper(model)
    return {f"module.{k}": v.detach().clone().contiguous() for k, v in wrapped.state_dict().items()}


def run(model: nn.Module, shapes: list[tuple[int, ...]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=gen) for shape in shapes]
    model.eval()
    with torch.no_grad():
        tokens = [model(x).detach().clone() for x in inputs]
    return inputs, tokens


def save(name: str, model: nn.Module, config: dict, shapes: list[tuple[int, ...]], seed: int, version: str) -> list[torch.Tensor]:
    inputs, tokens = run(model, shapes, seed)
    payload = {
        "state_dict": training_layout(model),
        "inputs": inputs,
        "tokens": tokens,
        "config": {k: v for k, v in config.items()},
        "upstream": UPSTREAM[version],
    }
    torch.save(payload, HERE / f"{name}.pt")
    print(f"{name}.pt: {len(payload['state_dict'])} keys, tokens {[tuple(t.shape) for t in tokens]}")
    return tokens


def main() -> None:
    torch.manual_seed(0)
    # 1-channel 2.0 inputs: the native 4x16x16 (grid 2x2x2), a wider one (sin-cos resized trilinearly,
    # RoPE on a non-square grid) and a shorter one (sin-cos takes the first rows)
    shapes_1 = [(1, 1, 4, 16, 16), (1, 1, 4, 16, 24), (1, 1, 2, 16, 16)]
    common = dict(img_size=16, num_frames=4, in_chans=1, **TINY_2_0)
    out = {}
    for i, (name, extra) in enumerate(
        [
            ("vjepa2_rope", dict(use_rope=True)),
            ("vjepa2_sincos", dict(use_rope=False)),
            ("vjepa2_sincos_uniform_power", dict(use_rope=False, uniform_power=True)),
        ]
    ):
        config = {**common, **extra}
        model = VisionTransformer(**config)
        trained_scale(model, seed=10 + i)
        out[name] = save(name, model, config, shapes_1, seed=100 + i, version="v2.0")

    config = {**common, "in_chans": 3, "use_rope": True}
    model = VisionTransformer(**config)
    trained_scale(model, seed=20)
    # a 3-channel stem fed 1-channel data as medctl does: the same volume in every channel
    gen = torch.Generator().manual_seed(200)
    one = [torch.randn(s, generator=gen) for s in shapes_1[:2]]
    with torch.no_grad():
        tokens = [model.eval()(x.expand(-1, 3, -1, -1, -1)).clone() for x in one]
    torch.save(
        {"state_dict": training_layout(model), "inputs": one, "tokens": tokens, "config": config,
         "upstream": UPSTREAM["v2.0"], "note": "inputs are 1-channel; upstream ran them repeated over its 3 channels"},
        HERE / "vjepa2_rope_3ch.pt",
    )  # fmt: skip
    print(f"vjepa2_rope_3ch.pt: tokens {[tuple(t.shape) for t in tokens]}")

    config = dict(img_size=32, num_frames=4, in_chans=1, **TINY_2_1)
    model = VisionTransformer21(**config)
    trained_scale(model, seed=30)
    shapes_21 = [(1, 1, 4, 32, 32), (1, 1, 2, 32, 48)]
    out["vjepa2_1"] = save("vjepa2_1", model, config, shapes_21, seed=300, version="v2.1")

    # the fixtures must tell the schemes apart: sin-cos vs RoPE weights differ anyway; check the 2.1
    # details each matter (tiled RoPE, no modality embedding) by far more than the tests' 1e-5
    inputs, _ = run(model, shapes_21, seed=300)
    with torch.no_grad():
        saved = model.video_mod_embed.clone()
        model.video_mod_embed.zero_()
        no_mod = model(inputs[0])
        model.video_mod_embed.copy_(saved)
        interleave = torch.Tensor.repeat_interleave
        torch.Tensor.repeat_interleave = lambda t, n, dim: torch.cat([t] * n, dim=dim)  # 2.0's tiling
        try:
            tiled = model(inputs[0])
        finally:
            torch.Tensor.repeat_interleave = interleave
    for what, other in (("no modality embedding", no_mod), ("tiled RoPE", tiled)):
        diff = (other - out["vjepa2_1"][0]).abs().max().item()
        print(f"2.1 with {what}: max |diff| {diff:.3g}")
        if diff < 1e-2:
            sys.exit(f"the 2.1 fixture does not tell `{what}` apart; raise the weights' scale")


if __name__ == "__main__":
    main()
