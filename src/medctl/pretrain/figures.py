"""The pretraining monitor's figures: t-SNE of embeddings, reconstruction panels, the loss curve.

t-SNE: van der Maaten and Hinton, JMLR 2008 (sklearn), perplexity adapted to small N. Figures are PNGs drawn
into their own matplotlib ``Figure`` (no pyplot, no global state); a figure that cannot be drawn is a logged
warning (:func:`drawn`), never the end of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from medctl.analysis.plots import plot_training_curves, save_figure
from medctl.data.tables import TargetSpec
from medctl.pretrain.embeddings import Embeddings
from medctl.progress import log

PANEL_ROWS = 4


def tsne_perplexity(n: int) -> float:
    """sklearn's default of 30 for large N; about N/3 for small N (it must stay below N)."""
    return float(max(1.0, min(30.0, (n - 1) / 3.0)))


def plot_tsne(
    vectors: np.ndarray,
    labels: np.ndarray | None,
    classes: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> Path | None:
    """A 2D t-SNE of (N, D) embeddings coloured by class (markers by ``groups``); None when N < 4."""
    n = len(vectors)
    if n < 4:
        return None
    points = TSNE(
        n_components=2, perplexity=tsne_perplexity(n), init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(np.asarray(vectors, dtype=np.float64))  # (N, 2)
    fig = Figure(figsize=(5.0, 4.2))
    ax = fig.subplots()
    groups = np.zeros(n, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    markers = dict(zip(sorted(set(groups.tolist())), "o^sDvP*", strict=False))
    labels = np.zeros(n, dtype=int) if labels is None else np.asarray(labels)
    colours = {c: f"C{i % 10}" for i, c in enumerate(sorted(set(labels.tolist())))}
    for group, marker in markers.items():
        for label, colour in colours.items():
            chosen = (groups == group) & (labels == label)
            if chosen.any():
                name = classes[label] if 0 <= label < len(classes) else str(label)
                legend = f"{name}" + (f" ({group})" if len(markers) > 1 else "")
                ax.scatter(points[chosen, 0], points[chosen, 1], s=18, c=colour, marker=marker, label=legend)
    ax.set_title(title or "t-SNE of embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def centre_slice(x: torch.Tensor) -> np.ndarray:
    """(C, *S) -> the first channel's 2D image; volumes give their centre axial slice."""
    image = x[0]
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    return image.detach().float().cpu().numpy()


def plot_reconstruction(
    original: torch.Tensor,
    mask: torch.Tensor,
    reconstruction: torch.Tensor,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Rows of samples, columns original | mask | reconstruction | residual; (B, C, *S) tensors, mask (B, 1, *S)."""
    rows = min(PANEL_ROWS, original.shape[0])
    fig = Figure(figsize=(8.4, 2.2 * rows))
    axes = fig.subplots(rows, 4, squeeze=False)
    for r in range(rows):
        image, recon = centre_slice(original[r]), centre_slice(reconstruction[r])
        low, high = float(np.percentile(image, 1)), float(np.percentile(image, 99))
        panels = [
            ("original", image, dict(cmap="gray", vmin=low, vmax=high)),
            (
                "mask" if mask.any() else "mask (none)",
                centre_slice(mask[r]),
                dict(cmap="magma", vmin=0, vmax=1),
            ),
            ("reconstruction", recon, dict(cmap="gray", vmin=low, vmax=high)),
            ("|residual|", np.abs(image - recon), dict(cmap="inferno", vmin=0)),
        ]
        for c, (name, data, style) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(data, **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss_curve(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """The training loss and its parts per epoch (and the k-NN accuracy when it was measured)."""
    keys = ["loss"] + sorted(
        {k[len("train_") :] for row in history for k in row if k.startswith("train_loss_")}
    )
    if any("val_knn_accuracy" in row for row in history):
        keys.append("knn_accuracy")
    return plot_training_curves(list(history), path, keys)


def draw_tsne(
    train: Embeddings, val: Embeddings, targets: Sequence[TargetSpec], path: Path, title: str, seed: int = 0
) -> Path | None:
    """t-SNE of the train and val embeddings that exist (either may be empty), coloured by the first
    class target's label."""
    parts = {name: e for name, e in (("train", train), ("val", val)) if len(e.vectors)}
    if not parts:
        return None
    vectors = np.concatenate([e.vectors for e in parts.values()])  # (N, D)
    groups = np.array([name for name, e in parts.items() for _ in range(len(e.vectors))], dtype=object)
    spec = next((t for t in targets if all(t.name in e.labels for e in parts.values())), None)
    labels = np.concatenate([e.labels[spec.name] for e in parts.values()]) if spec is not None else None
    classes = spec.classes if spec is not None else []
    return plot_tsne(vectors, labels, classes, path, title=title, groups=groups, seed=seed)


def drawn(what: str, draw: Callable[..., Path | None], *args: Any) -> Path | None:
    """``draw(*args)``, or None with a logged warning when it fails: a figure never ends a run."""
    try:
        return draw(*args)
    except Exception as exc:  # monitoring is a look at the run, not the run: say what failed, go on
        log(f"warning: could not draw {what} ({type(exc).__name__}: {exc}); the run goes on")
        return None
