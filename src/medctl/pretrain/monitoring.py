"""Is pretraining learning anything? The monitor a run carries: collapse checks and their verdict, figures.

Everything runs on fixed, seeded subsets of the train and val splits (``pretrain.monitor_samples``
each), embedded with the method's online encoder in eval mode without gradients; what is measured on them
(collapse statistics, the online k-NN) is :mod:`medctl.pretrain.embeddings`, the figures (t-SNE,
reconstruction panels, the loss curve) :mod:`medctl.pretrain.figures`.

- collapse: an absolute threshold on the embeddings' spread cannot tell a good encoder from a bad one
  (mean-pooled tokens, or GroupNorm + ReLU maps, sit far below ``1 / sqrt(D)`` at any stage), so the check
  is calibrated: :func:`calibrate` measures the same encoder before pretraining (its random initialisation,
  or ``model.checkpoint``), every check reports ``embed_std_ratio`` (now / before) and ``embed_rank``, and a
  warning is logged only when the representation is worse than before: the ratio below ``COLLAPSE_RATIO``
  and, where labels allow a k-NN, its accuracy no better than before. The advice names what controls collapse in that method
  (:data:`medctl.pretrain.verdict.COLLAPSE_ADVICE`).
- the collapse verdict after an epoch (spread, effective rank, k-NN) and the shortcut watch:
  :mod:`medctl.pretrain.verdict`.

Without a val split (normal for unlabelled pretraining) everything runs on the train subset alone and the
k-NN accuracy is left out. A figure that cannot be drawn is a logged warning, never the end of a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medctl.pretrain.embeddings import (
    Embeddings,
    collapse_stats,
    embed_items,
    fixed_subset,
    knn_metrics,
    stack_items,
    std_ratio,
)
from medctl.pretrain.figures import PANEL_ROWS, draw_tsne, drawn, plot_loss_curve, plot_reconstruction
from medctl.pretrain.verdict import collapse_advice
from medctl.progress import log
from medctl.training.precision import autocast_context

COLLAPSE_RATIO = 0.5  # warn below half the spread the encoder had before pretraining (and no k-NN gain)


def collapse_warning(
    stats: dict[str, float], reference: dict[str, float] | None, method: str, knn: float | None = None
) -> str:
    """A warning line when the representation is worse than the encoder's own before pretraining, "" otherwise.

    Worse: the mean per-dimension std below ``COLLAPSE_RATIO`` times ``reference["embed_std_mean"]`` and,
    when both k-NN accuracies are known, ``knn`` no higher than ``reference["knn_accuracy"]``. Without a
    reference (monitoring that was never calibrated) nothing is claimed.
    """
    if not reference:
        return ""
    ratio = std_ratio(stats, reference)
    knn_before = reference.get("knn_accuracy")
    if ratio >= COLLAPSE_RATIO or (knn is not None and knn_before is not None and knn > knn_before):
        return ""
    knn_text = (
        f" and k-NN accuracy {knn:.2f} is no better than its {knn_before:.2f}"
        if knn is not None and knn_before is not None
        else ""
    )
    advice = collapse_advice(method)
    return (
        f"embeddings are collapsing: mean per-dimension std {stats['embed_std_mean']:.2e} is {ratio:.2f}x that of "
        f"the encoder before pretraining ({reference['embed_std_mean']:.2e}){knn_text}; {advice}"
    )


def warn_if_collapsing(
    stats: dict[str, float], reference: dict[str, float] | None, method: str, knn: float | None = None
) -> None:
    message = collapse_warning(stats, reference, method, knn)
    if message:
        log(f"warning: {message}")


# ------------------------------------------------------------------------------------- during a run
@dataclass
class Monitor:
    """What a run monitors on: fixed subsets of the train and val splits, the embedding, where figures go."""

    train: Any  # a CacheDataset (items with "image", "id" and labels)
    train_indices: list[int]
    val: Any
    val_indices: list[int]
    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, C, *S) -> (B, D), eval mode, no gradient
    figures: Path
    batch_size: int
    device: torch.device
    method: str = ""  # pretrain.method, for the advice of a collapse warning
    reference: dict[str, float] = field(default_factory=dict)  # calibrate(): the encoder before pretraining


def make_monitor(
    method: nn.Module,
    train: Any,
    val: Any,
    *,
    limit: int,
    seed: int,
    figures: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    method_name: str = "",
) -> Monitor:
    """Fixed subsets of at most ``limit`` items per split, and ``method.embed`` under the run's autocast."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        method.eval()
        with torch.no_grad(), autocast_context(device, precision):
            return method.embed(x)

    train_indices, val_indices = (
        fixed_subset(len(train), limit, seed),
        fixed_subset(len(val), limit, seed + 1),
    )
    return Monitor(
        train, train_indices, val, val_indices, embed, Path(figures), batch_size, device, method_name
    )


def calibrate(monitor: Monitor) -> dict[str, float]:
    """Collapse stats and k-NN accuracy of the encoder as it is now, before pretraining: the reference
    every later collapse check is compared with (kept in ``monitor.reference``)."""
    train, val = embed_splits(monitor)
    reference = collapse_stats(val.vectors if len(val.vectors) >= 2 else train.vectors)
    reference |= knn_metrics(train, val)
    monitor.reference = reference
    return reference


def due(epoch: int, every: int, epochs: int) -> bool:
    """Every ``every`` epochs (0: never), and always at the last epoch when enabled."""
    return every > 0 and ((epoch + 1) % every == 0 or epoch == epochs - 1)


def embed_splits(monitor: Monitor) -> tuple[Embeddings, Embeddings]:
    """Embeddings of the fixed train and val subsets."""
    targets, size, device = monitor.train.targets, monitor.batch_size, monitor.device
    train = embed_items(
        monitor.embed, monitor.train, monitor.train_indices, targets, batch_size=size, device=device
    )
    val = embed_items(
        monitor.embed, monitor.val, monitor.val_indices, targets, batch_size=size, device=device
    )
    return train, val


def monitor_epoch(
    method: nn.Module,
    monitor: Monitor,
    epoch: int,
    epochs: int,
    *,
    monitor_every: int,
    knn_every: int,
    tsne_every: int,
    verdict: bool = False,
) -> dict[str, float]:
    """Collapse stats + reconstruction panel, k-NN accuracy and t-SNE, each when it is due this epoch
    (``verdict``: collapse stats and k-NN this epoch whatever the schedule says)."""
    check, knn = due(epoch, monitor_every, epochs) or verdict, due(epoch, knn_every, epochs) or verdict
    tsne = tsne_every > 0 and (epoch + 1) % tsne_every == 0
    if not (check or knn or tsne):
        return {}
    train, val = embed_splits(monitor)
    metrics: dict[str, float] = {}
    tag = f"epoch{epoch + 1:03d}"
    if knn:
        metrics |= knn_metrics(train, val)
    if check:
        stats = collapse_stats(val.vectors if len(val.vectors) >= 2 else train.vectors)
        if monitor.reference:
            stats["embed_std_ratio"] = std_ratio(stats, monitor.reference)
        warn_if_collapsing(stats, monitor.reference, monitor.method, metrics.get("knn_accuracy"))
        metrics |= stats
        drawn("the reconstruction panel", draw_panel, method, monitor,
              monitor.figures / f"reconstruction_{tag}.png", f"epoch {epoch + 1}")  # fmt: skip
    if tsne:
        drawn("the t-SNE", draw_tsne, train, val, monitor.train.targets, monitor.figures / f"tsne_{tag}.png",
              f"epoch {epoch + 1}")  # fmt: skip
    return metrics


def draw_panel(method: nn.Module, monitor: Monitor, path: Path, title: str) -> Path | None:
    """Reconstruction panel of the first val items (train when val is empty); None if the method has none."""
    use_val = bool(monitor.val_indices)
    dataset = monitor.val if use_val else monitor.train
    indices = (monitor.val_indices if use_val else monitor.train_indices)[:PANEL_ROWS]
    batch = stack_items(dataset, indices)
    method.eval()
    with torch.no_grad():
        shown = method.reconstruct(batch["image"].to(monitor.device))
    if shown is None:
        return None
    return plot_reconstruction(shown["original"], shown["mask"], shown["reconstruction"], path, title=title)


def final_figures(
    method: nn.Module, monitor: Monitor, history: Sequence[dict[str, Any]], *, seed: int
) -> list[Path]:
    """The final t-SNE, reconstruction panel and loss curve (those that apply)."""
    train, val = embed_splits(monitor)
    figures = monitor.figures
    paths = [
        drawn("the final t-SNE", draw_tsne, train, val, monitor.train.targets, figures / "tsne_final.png",
              "final embeddings", seed),
        drawn("the final reconstruction panel", draw_panel, method, monitor, figures / "reconstruction_final.png",
              "final"),
        drawn("the loss curve", plot_loss_curve, history, figures / "loss_curve.png") if history else None,
    ]  # fmt: skip
    return [path for path in paths if path is not None]
