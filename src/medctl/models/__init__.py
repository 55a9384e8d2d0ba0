"""Encoders, heads, the classifier, the encoder registry and checkpoints."""
