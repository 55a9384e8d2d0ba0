"""What one saliency sample brings and asks: its image, mask and label checked, and the class its maps explain.

A sample is a mapping with ``image`` ``(C, *S)``, ``id``, and optionally ``label`` (or the target's own
name, as :class:`~medctl.data.dataset.CacheDataset` items hold it), ``mask`` ``(1, *S)`` and ``geometry``
(the manifest row); see :func:`medctl.saliency.pipeline.run_saliency`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medctl.errors import ConfigError, DataError, UserError
from medctl.saliency.attribution import TargetKind


def check_target(target: str, classes: Sequence[str], target_name: str) -> None:
    """``saliency.target`` must be ``pred``, ``true`` or one of the target's classes (ConfigError)."""
    if target not in ("pred", "true") and target not in classes:
        raise ConfigError(
            [
                f"`saliency.target` = {target!r}: use pred, true or a class of `{target_name}`: {', '.join(classes)}"
            ]
        )


def misclassified(label: int | list[int] | None, predicted: int, kind: str) -> bool | None:
    """True when the sample's label is not the predicted class; None without a single-class label."""
    if label is None or isinstance(label, list) or kind == "multilabel":
        return None
    return label != predicted


def row_is_spectrogram(record: Mapping[str, Any] | None) -> bool:
    """An EEG spectrogram window (:mod:`medctl.data.spectrogram`): its manifest row has a sampling rate."""
    sfreq = record.get("sfreq") if record else None
    return sfreq is not None and sfreq == sfreq  # image rows hold None (NaN once read back)


def sample_image(sample: Mapping[str, Any], spatial_dims: int | None) -> torch.Tensor:
    image = torch.as_tensor(sample["image"]).float()
    if image.ndim not in (3, 4) or (spatial_dims is not None and image.ndim != spatial_dims + 1):
        expected = (
            f"(C, *S) with {spatial_dims} spatial axes" if spatial_dims else "(C, H, W) or (C, D, H, W)"
        )
        raise DataError(
            f"sample {sample['id']}: image has shape {tuple(image.shape)}; the model needs {expected}"
        )
    return image


def has_lesion(sample: Mapping[str, Any]) -> bool:
    mask = sample.get("mask")
    return mask is not None and bool((mask > 0).any())


def sample_mask(sample: Mapping[str, Any], spatial: tuple[int, ...], sample_id: str) -> np.ndarray | None:
    mask = sample.get("mask")
    if mask is None:
        return None
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if mask.ndim == len(spatial) + 1:
        mask = mask[0]  # (1, *S) -> (*S)
    if mask.shape != spatial:
        raise DataError(f"sample {sample_id}: mask shape {mask.shape} does not match the image's {spatial}")
    return mask > 0


def infer_kind(
    classifier: nn.Module, target_name: str, x: torch.Tensor, classes: Sequence[str], kind: TargetKind | None
) -> TargetKind:
    """The target's kind, checked against the head's width and the class list."""
    with torch.no_grad():
        outputs = classifier(x)
    if target_name not in outputs:
        raise UserError(
            f"the classifier has no head `{target_name}`; its heads are: {', '.join(sorted(outputs))}"
        )
    width = int(outputs[target_name].shape[-1])
    kind = kind or ("binary" if width == 1 else "multiclass")
    expected = 1 if kind == "binary" else len(classes)
    if kind == "binary" and len(classes) != 2:
        raise UserError(
            f"target `{target_name}` is binary: give its two class names (negative, positive), got {classes}"
        )
    if width != expected:
        raise UserError(
            f"target `{target_name}`: the head gives {width} logits but {len(classes)} classes were given "
            f"({kind}); the classes must come from the same checkpoint"
        )
    return kind


def sample_label(sample: Mapping[str, Any], target_name: str, kind: str) -> int | list[int] | None:
    """The true class index (multilabel: indices of positive labels), or None when unlabelled."""
    value = sample.get("label", sample.get(target_name))
    if value is None:
        return None
    array = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if kind == "multilabel":
        return [int(i) for i in np.flatnonzero(array.ravel() > 0.5)]
    if array.size != 1 or (isinstance(array.item(), float) and math.isnan(array.item())):
        return None
    index = int(array.item())
    return index if index >= 0 else None


def class_to_explain(
    target: str, predicted: int, label: int | list[int] | None, classes: Sequence[str], sample_id: str
) -> int:
    if target == "pred":
        return predicted
    if target == "true":
        if isinstance(label, list):  # multilabel: the first positive label
            label = label[0] if label else None
        if label is None:
            raise DataError(
                f"sample {sample_id} has no label; saliency.target = 'true' needs labels (use 'pred')"
            )
        if not 0 <= label < len(classes):
            raise DataError(f"sample {sample_id}: label {label} is not a class index below {len(classes)}")
        return label
    return list(classes).index(target)


def label_text(label: int | list[int] | None, classes: Sequence[str]) -> str:
    if label is None:
        return ""
    if isinstance(label, list):
        return ";".join(classes[i] for i in label if i < len(classes))
    return classes[label] if 0 <= label < len(classes) else str(label)
