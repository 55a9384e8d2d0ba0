"""Heads and the classifier: shapes, the attentive pooler against a reference, the cached-embedding path."""

from __future__ import annotations

import math

import pytest
import torch

from medctl.errors import ConfigError
from medctl.models.classifier import Classifier, build_classifier
from medctl.models.heads import AttentiveHead, InputStandardized, LinearHead, MLPHead, build_head
from medctl.models.registry import build_encoder


def test_build_head_kinds_and_shapes(seed):
    z, tokens = torch.randn(4, 32), torch.randn(4, 10, 32)
    assert isinstance(build_head("linear", 32, 3), LinearHead) and build_head("linear", 32, 3)(z).shape == (4, 3)
    assert isinstance(build_head("mlp", 32, 1, hidden=16, dropout=0.2), MLPHead)
    assert isinstance(build_head("mlp", 32, 1, hidden=0), LinearHead)  # hidden 0 means linear
    assert build_head("attentive", 32, 5)(tokens).shape == (4, 5)
    with pytest.raises(ConfigError, match="model.head.kind"):
        build_head("transformer", 32, 2)
    with pytest.raises(ConfigError, match="at least one output"):
        build_head("linear", 32, 0)


def test_attentive_pooler_matches_reference(seed):
    head = AttentiveHead(32, 3, num_heads=4).eval()
    tokens = torch.randn(2, 7, 32)
    # reference: softmax(q k^T / sqrt(d)) v per head, residual, MLP, linear
    q = head.q(head.query).view(1, 4, 8)  # (1, heads, d)
    kv = head.kv(head.norm1(tokens)).view(2, 7, 2, 4, 8)
    k, v = kv[:, :, 0], kv[:, :, 1]  # (B, N, heads, d)
    weights = torch.softmax(torch.einsum("hd,bnhd->bhn", q[0], k) / math.sqrt(8), dim=-1)
    attended = torch.einsum("bhn,bnhd->bhd", weights, v).reshape(2, 32)
    pooled = head.query[0] + attended
    pooled = pooled + head.mlp(head.norm2(pooled))
    with torch.no_grad():
        torch.testing.assert_close(head(tokens), head.fc(pooled), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        head(torch.randn(2, 32))


def test_classifier_has_one_head_per_target_and_cached_embedding_path(seed):
    targets = [
        {"name": "edema", "kind": "binary", "classes": ["no", "yes"]},
        {"name": "grade", "kind": "multiclass", "classes": ["1", "2", "3", "4"]},
        {"name": "findings", "kind": "multilabel", "classes": ["a", "b", "c"]},
    ]
    encoder = build_encoder("mt3_tiny", input_size=(8, 16, 16))
    classifier = build_classifier(encoder, targets, kind="mlp", hidden=16, dropout=0.1).eval()
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        logits = classifier(x)
        cached = classifier.forward_from_embeddings(encoder(x))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"edema": (2, 1), "grade": (2, 4), "findings": (2, 3)}
    assert all(torch.equal(logits[k], cached[k]) for k in logits)
    assert isinstance(classifier, Classifier) and classifier.encoder is encoder and set(classifier.heads) == set(logits)


def test_attentive_classifier_reads_tokens_or_flattened_maps(seed):
    target = [{"name": "y", "kind": "multiclass", "classes": ["a", "b"]}]
    for name, size in (("vit3d_test", (8, 16, 16)), ("resnet_test_2d", (32, 32))):
        classifier = build_classifier(build_encoder(name, input_size=size), target, kind="attentive")
        out = classifier(torch.randn(2, 1, *size))["y"]
        assert out.shape == (2, 2) and torch.isfinite(out).all()
        out.sum().backward()
        assert classifier.encoder.gradcam_layer is not None
        with pytest.raises(ConfigError, match="train.feature_cache"):
            classifier.forward_from_embeddings(torch.randn(2, classifier.encoder.embed_dim))


def test_classifier_needs_a_target():
    with pytest.raises(ConfigError, match="data.targets"):
        Classifier(build_encoder("vit3d_test", input_size=(8, 16, 16)), {}, "linear")


def test_standardised_inputs_fold_into_plain_heads_that_compute_the_same_logits(seed):
    targets = [
        {"name": "edema", "kind": "binary", "classes": ["no", "yes"]},
        {"name": "grade", "kind": "multiclass", "classes": ["1", "2", "3"]},
        {"name": "age", "kind": "regression", "classes": []},
    ]
    encoder = build_encoder("mt3_tiny", input_size=(8, 16, 16))
    for kind, hidden in (("linear", 0), ("mlp", 16)):
        classifier = build_classifier(encoder, targets, kind=kind, hidden=hidden).eval()
        classifier.heads["age"].set_scale(50.0, 12.0)
        plain_keys = set(classifier.state_dict())
        train = 10.0 + 0.1 * torch.randn(64, encoder.embed_dim)  # far from zero, a small spread
        train[:, 0] = 3.0  # a constant dimension keeps a floor, not a division by zero
        classifier.standardize_inputs(train)
        head = classifier.heads["edema"]
        assert isinstance(head, InputStandardized)
        torch.testing.assert_close(head.mean, train.mean(0))
        assert bool(torch.isfinite(head.std).all()) and float(head.std[0]) > 0
        z = 10.0 + 0.1 * torch.randn(5, encoder.embed_dim)  # (B, D) raw embeddings
        folded = classifier.folded()
        assert folded.encoder is encoder and set(folded.state_dict()) == plain_keys  # checkpoints keep their format
        with torch.no_grad():
            wrapped, plain = classifier.forward_from_embeddings(z), folded.forward_from_embeddings(z)
            standardized = (z - head.mean) / head.std
            torch.testing.assert_close(wrapped["edema"], head.head(standardized))
        for name in wrapped:
            torch.testing.assert_close(plain[name], wrapped[name], atol=1e-4, rtol=1e-4)
        assert not isinstance(folded.heads["edema"], InputStandardized)
    with pytest.raises(TypeError, match="AttentiveHead"):
        InputStandardized.of(build_head("attentive", 32, 2), torch.randn(8, 32))


def test_the_attentive_pooler_equals_cross_attention_over_every_token_key_and_value():
    """The pooler skips the per-token keys and values (heads.py); the reference computes them."""
    torch.manual_seed(0)
    head = AttentiveHead(32, 3, num_heads=4)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.3 * torch.randn_like(param))  # away from LayerNorm's identity affine
    tokens = torch.randn(5, 11, 32) * 2 + 1  # (B, N, D)
    B, N, D, h = 5, 11, 32, 4
    query = head.query.expand(B, -1, -1)  # (B, 1, D)
    q = head.q(query).view(B, 1, h, D // h).transpose(1, 2)  # (B, h, 1, d)
    k, v = head.kv(head.norm1(tokens)).view(B, N, 2, h, D // h).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D)
    reference = query + attended
    reference = (reference + head.mlp(head.norm2(reference)))[:, 0]
    torch.testing.assert_close(head.pool(tokens), reference, atol=1e-5, rtol=1e-4)
