"""vit3d: V-JEPA 2's parameter layout, sincos and RoPE positions (with V-JEPA 2's quirk), token masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medctl.models.encoders.vit3d import RotaryPositions, resize_pos_embed
from medctl.models.registry import build_encoder


def vjepa2_layout(embed_dim: int, depth: int, mlp_hidden: int, tokens: int, in_channels: int = 1) -> dict[str, tuple]:
    """Key -> shape of V-JEPA 2's VisionTransformer (3D patch embed 2x16x16, no class token)."""
    c = embed_dim
    layout = {"patch_embed.proj.weight": (c, in_channels, 2, 16, 16), "patch_embed.proj.bias": (c,), "pos_embed": (1, tokens, c)}
    for i in range(depth):
        b = f"blocks.{i}."
        layout |= {b + "norm1.weight": (c,), b + "norm1.bias": (c,), b + "norm2.weight": (c,), b + "norm2.bias": (c,)}
        layout |= {b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,)}
        layout |= {b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,)}
        layout |= {b + "mlp.fc1.weight": (mlp_hidden, c), b + "mlp.fc1.bias": (mlp_hidden,)}
        layout |= {b + "mlp.fc2.weight": (c, mlp_hidden), b + "mlp.fc2.bias": (c,)}
    return layout | {"norm.weight": (c,), "norm.bias": (c,)}


@pytest.mark.parametrize(
    ("name", "width", "depth", "heads", "hidden"),
    [
        ("vit3d_tiny", 192, 12, 3, 768),
        ("vit3d_small", 384, 12, 6, 1536),
        ("vit3d_base", 768, 12, 12, 3072),
        ("vit3d_large", 1024, 24, 16, 4096),
        ("vit3d_huge", 1280, 32, 16, 5120),
        ("vit3d_giant", 1408, 40, 22, 6144),
        ("vit3d_giant_h16", 1408, 40, 16, 6144),
    ],
)
def test_state_dict_matches_vjepa2_names_and_shapes(name, width, depth, heads, hidden):
    with torch.device("meta"):
        encoder = build_encoder(name, in_channels=1, input_size=(16, 64, 64))
    tokens = 8 * 4 * 4
    layout = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert layout == vjepa2_layout(width, depth, hidden, tokens)
    assert encoder.blocks[0].attn.num_heads == heads
    assert all(m.eps == 1e-6 for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    assert "pos_embed" not in dict(encoder.named_parameters())  # fixed, never trained


def test_rope_variant_has_no_pos_embed():
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 16), pos_embed="rope")
    assert "pos_embed" not in encoder.state_dict()


def reference_sincos(grid: tuple[int, int, int], dim: int) -> np.ndarray:
    """V-JEPA's 3D table, token by token: [depth: dim/2 | height: dim/4 | width: dim/4] of [sin | cos]."""
    t, h, w = grid
    rows = []
    for d_i in range(t):
        for h_i in range(h):
            for w_i in range(w):
                row = []
                for pos, part in ((d_i, dim // 2), (h_i, dim // 4), (w_i, dim // 4)):
                    freqs = [10000.0 ** (-k / (part / 2)) for k in range(part // 2)]
                    row += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
                rows.append(row)
    return np.array(rows)


def test_sincos_pos_embed_matches_a_reference():
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 24))  # grid (4, 2, 3)
    expected = reference_sincos((4, 2, 3), 64)
    np.testing.assert_allclose(encoder.pos_embed[0].numpy(), expected, atol=1e-6)


def reference_rope_attention(attn: torch.nn.Module, x: torch.Tensor, ids: np.ndarray, grid) -> np.ndarray:
    """Self-attention with V-JEPA 2's RoPE, written out in numpy (float64), token by token.

    Per head, channels [0, s) rotate by the depth index, [s, 2s) by height, [2s, 3s) by width, the rest
    stay. Channel j of a part uses frequency omega[j mod s/2] (V-JEPA 2 tiles the frequencies) and is
    paired with its neighbour: out[2i] = v[2i] cos - v[2i+1] sin, out[2i+1] = v[2i+1] cos + v[2i] sin.
    """
    W_qkv, b_qkv = attn.qkv.weight.detach().double().numpy(), attn.qkv.bias.detach().double().numpy()
    W_out, b_out = attn.proj.weight.detach().double().numpy(), attn.proj.bias.detach().double().numpy()
    xs = x.detach().double().numpy()[0]  # (N, C)
    n, c = xs.shape
    heads = attn.num_heads
    hd = c // heads
    s = 2 * ((hd // 3) // 2)
    half = s // 2
    omega = np.array([10000.0 ** (-(k / half)) for k in range(half)])
    _, gh, gw = grid
    positions = np.stack([ids // (gh * gw), (ids // gw) % gh, ids % gw], axis=1)  # (N, 3)

    qkv = xs @ W_qkv.T + b_qkv  # (N, 3C)
    q, k, v = (qkv[:, i * c : (i + 1) * c].reshape(n, heads, hd) for i in range(3))

    def rotate(vec: np.ndarray, pos: np.ndarray) -> np.ndarray:  # vec (hd,), pos (3,)
        out = vec.copy()
        for axis in range(3):
            part = vec[axis * s : (axis + 1) * s]
            for j in range(s):
                angle = pos[axis] * omega[j % half]
                partner = -part[j + 1] if j % 2 == 0 else part[j - 1]
                out[axis * s + j] = part[j] * math.cos(angle) + partner * math.sin(angle)
        return out

    out = np.zeros((n, heads, hd))
    for head in range(heads):
        qr = np.stack([rotate(q[i, head], positions[i]) for i in range(n)])
        kr = np.stack([rotate(k[i, head], positions[i]) for i in range(n)])
        scores = qr @ kr.T / math.sqrt(hd)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[:, head] = weights @ v[:, head]
    return out.reshape(n, c) @ W_out.T + b_out


def test_rope_attention_matches_independent_reference(seed):
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 24), pos_embed="rope").eval()
    attn = encoder.blocks[0].attn
    grid = encoder.grid  # (4, 2, 3)
    n = math.prod(grid)
    x = torch.randn(1, n, 64)
    with torch.no_grad():
        out = attn(x, RotaryPositions(torch.arange(n), grid))
    np.testing.assert_allclose(out[0].numpy(), reference_rope_attention(attn, x, np.arange(n), grid), atol=1e-5)

    keep = torch.tensor([[0, 5, 7, 12, 23]])  # masked: positions are the kept tokens' own
    with torch.no_grad():
        out = attn(x[:, keep[0]], RotaryPositions(keep, grid))
    expected = reference_rope_attention(attn, x[:, keep[0]], keep[0].numpy(), grid)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_rope_keeps_vjepa2_tiled_frequencies_not_interleaved():
    rope = RotaryPositions(torch.tensor([1, 2]), (4, 1, 1))  # depth positions 1 and 2
    cos_d, sin_d, *_ = rope.tables(8, torch.float32)
    omega = 1.0 / 10000 ** (torch.arange(4) / 4.0)
    torch.testing.assert_close(cos_d[1], torch.cos(2 * torch.cat([omega, omega])))
    assert not torch.allclose(cos_d[1], torch.cos(2 * omega.repeat_interleave(2)))


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_masks_keep_positions_of_the_kept_tokens(seed, pos_embed):
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 16), pos_embed=pos_embed).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    n = math.prod(encoder.grid)
    with torch.no_grad():
        full = encoder.forward_features(x)  # (2, N, C)
        every = encoder.forward_features(x, masks=torch.arange(n).expand(2, n))
        order = torch.stack([torch.randperm(n), torch.randperm(n)])  # (2, N): every token, shuffled
        shuffled = encoder.forward_features(x, masks=order)
        two = encoder.forward_features(x, masks=[order[:, :5], order[:, 5:10]])
    torch.testing.assert_close(every, full)
    # attention is permutation-equivariant: with positions travelling with their tokens, the output permutes
    torch.testing.assert_close(shuffled, torch.gather(full, 1, order[..., None].expand(-1, -1, full.shape[-1])))
    assert two.shape == (4, 5, 64)  # masks concatenated along the batch, as V-JEPA does
    torch.testing.assert_close(two[:2], encoder.forward_features(x, masks=order[:, :5]))


def test_pos_embed_for_other_sizes_follows_vjepa2_rule():
    table = torch.randn(1, 4 * 2 * 2, 8)
    # fewer depth steps on the same in-plane grid: the first rows
    torch.testing.assert_close(resize_pos_embed(table, (4, 2, 2), (2, 2, 2)), table[:, :8])
    # anything else: trilinear with V-JEPA 2's scale factors
    resized = resize_pos_embed(table, (4, 2, 2), (8, 4, 6))
    expected = torch.nn.functional.interpolate(
        table.reshape(1, 4, 2, 2, 8).permute(0, 4, 1, 2, 3), scale_factor=(2.0, 2.0, 3.0), mode="trilinear"
    ).permute(0, 2, 3, 4, 1).reshape(1, -1, 8)
    torch.testing.assert_close(resized, expected)


def test_other_input_size_runs_and_smaller_depth_reuses_first_positions(seed):
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 16)).eval()
    with torch.no_grad():
        assert encoder.forward_features(torch.randn(1, 1, 12, 24, 16)).shape == (1, 6 * 3 * 2, 64)
        short = torch.randn(1, 1, 4, 16, 16)
        tokens = encoder.patch_embed(short) + encoder.pos_embed[:, :8]
        for block in encoder.blocks:
            tokens = block(tokens)
        torch.testing.assert_close(encoder.forward_features(short), encoder.norm(tokens))


def test_pooled_embedding_is_the_token_mean(seed):
    encoder = build_encoder("vit3d_test", input_size=(8, 16, 16)).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder.forward_features(x).mean(1))


def test_activation_checkpointing_gives_the_same_gradients(seed):
    plain = build_encoder("vit3d_test", input_size=(8, 16, 16), pos_embed="rope")
    ckpt = build_encoder("vit3d_test", input_size=(8, 16, 16), pos_embed="rope", activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 16, 16)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    torch.testing.assert_close(ckpt.blocks[0].attn.qkv.weight.grad, plain.blocks[0].attn.qkv.weight.grad)
