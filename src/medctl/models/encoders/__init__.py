"""Encoder families, one file each; the registry (``medctl.models.registry``) names their builders."""

from medctl.models.encoders.base import Encoder

__all__ = ["Encoder"]
