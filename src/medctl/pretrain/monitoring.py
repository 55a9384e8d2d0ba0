"""Is pretraining learning anything? Collapse checks, online k-NN, t-SNE, reconstruction panels, loss curve.

Everything runs on fixed, seeded subsets of the train and val splits (``pretrain.monitor_samples``
each), embedded with the method's online encoder in eval mode without gradients:

- collapse: the per-dimension standard deviation of the L2-normalised embeddings, mean and min. Spread
  out unit vectors in D dimensions have a std near ``1 / sqrt(D)`` per dimension; a collapsed encoder
  (every input mapped to one point) drives it to 0. An absolute threshold cannot tell a good encoder from
  a bad one (mean-pooled tokens, or GroupNorm + ReLU maps, sit far below ``1 / sqrt(D)`` at any stage), so
  the check is calibrated: :func:`calibrate` measures the same encoder before pretraining (its random
  initialisation, or ``model.checkpoint``), every check reports ``embed_std_ratio`` (now / before), and a
  warning is logged only when the representation is worse than before: the ratio below
  ``COLLAPSE_RATIO`` and, where labels allow a k-NN, its accuracy no better than before. The advice
  names what controls collapse in that method (:data:`COLLAPSE_ADVICE`).
- the collapse verdict (:class:`CollapseCheck`, on by default and with monitoring off too): after
  ``pretrain.collapse_check_epoch`` epochs and after the last, the spread against the calibrated reference and
  the online k-NN against chance (:class:`CollapseVerdict`); a failed one is a loud warning, and ends the run
  under ``pretrain.stop_on_collapse`` (:class:`EpochWatch`, ``fit``'s ``stop_when``), which also warns when a
  pretext head solves its task in the first epochs while BYOL stalls (a shortcut).
- k-NN: each val embedding takes the majority label of its ``k = min(5, N_train)`` nearest train
  embeddings by cosine similarity (Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018); the accuracy, per binary/multiclass target.
- t-SNE (van der Maaten and Hinton, JMLR 2008; sklearn) of the train and val subsets coloured by label,
  perplexity adapted to small N.

Without a val split (normal for unlabelled pretraining) everything runs on the train subset alone and the
k-NN accuracy is left out. A figure that cannot be drawn is a logged warning, never the end of a run.
- reconstruction panels (original, mask, reconstruction, residual) for methods that reconstruct.
- the loss curve at the end, from ``fit``'s history.

Figures are PNGs drawn into their own matplotlib ``Figure`` (no pyplot, no global state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from medctl.data.tables import TargetSpec
from medctl.evaluation.plots import plot_training_curves, save_figure
from medctl.progress import log
from medctl.training.distributed import is_rank0
from medctl.training.precision import autocast_context

COLLAPSE_RATIO = 0.5  # warn below half the spread the encoder had before pretraining (and no k-NN gain)
COLLAPSE_ADVICE = {
    "byol": "the EMA target is what keeps BYOL apart: raise pretrain.ema_momentum (e.g. 0.996) or lower pretrain.lr",
    "jepa": "the EMA target encoder moves too fast: raise pretrain.ema_momentum (e.g. 0.999) or lower pretrain.lr; "
    "smaller target blocks (pretrain.jepa.mask_block_scale) make the prediction easier to learn",
    "mim_contrastive": "InfoNCE spreads the projections, not the pooled embedding: raise pretrain.mim_contrastive.contrastive_weight "
    "relative to pretrain.mim_contrastive.mim_weight, raise data.batch_size (more negatives) or lower pretrain.lr",
}
PANEL_ROWS = 4


@dataclass
class Embeddings:
    """Embeddings of some items of a dataset, with their labels (binary/multiclass targets only)."""

    vectors: np.ndarray  # (N, D) float32
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # target -> (N,) class indices
    ids: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- embeddings
def fixed_subset(n: int, limit: int, seed: int) -> list[int]:
    """At most ``limit`` of ``range(n)``, drawn once with ``seed`` (sorted), so every epoch sees the same items."""
    if n <= limit:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def stack_items(dataset: Any, indices: Sequence[int]) -> dict[str, Any]:
    """Items ``indices`` of a map-style dataset collated by hand (no DataLoader, so no RNG is drawn)."""
    items = [dataset[i] for i in indices]
    batch: dict[str, Any] = {"ids": [item["id"] for item in items]}
    for key in items[0]:
        if isinstance(items[0][key], torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


@torch.no_grad()
def embed_items(
    embed: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    indices: Sequence[int],
    targets: Sequence[TargetSpec],
    *,
    batch_size: int,
    device: torch.device,
) -> Embeddings:
    """``embed`` (B, C, *S) -> (B, D) over ``dataset[indices]`` in batches; labels of class targets kept."""
    vectors, ids = [], []
    labels: dict[str, list[np.ndarray]] = {t.name: [] for t in targets if t.kind != "multilabel"}
    for start in range(0, len(indices), batch_size):
        batch = stack_items(dataset, indices[start : start + batch_size])
        vectors.append(embed(batch["image"].to(device)).float().cpu().numpy())  # (b, D)
        ids += batch["ids"]
        for name in labels:
            labels[name].append(batch[name].numpy().reshape(-1))
    dim = vectors[0].shape[1] if vectors else 0
    return Embeddings(
        np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        {name: np.concatenate(parts) for name, parts in labels.items() if parts},
        ids,
    )


# --------------------------------------------------------------------------------------- collapse
def collapse_stats(vectors: np.ndarray) -> dict[str, float]:
    """Per-dimension std of L2-normalised embeddings (N, D): its mean and min, and 1/sqrt(D) for scale."""
    if len(vectors) < 2:
        raise ValueError("the collapse check needs at least 2 embeddings")
    unit = F.normalize(torch.as_tensor(vectors, dtype=torch.float64), dim=1)  # (N, D)
    std = unit.std(dim=0)  # (D,)
    return {
        "embed_std_mean": float(std.mean()),
        "embed_std_min": float(std.min()),
        "embed_std_reference": 1.0 / math.sqrt(unit.shape[1]),
    }


def std_ratio(stats: dict[str, float], reference: dict[str, float]) -> float:
    """Mean per-dimension std now over the same before pretraining (inf when the reference is 0)."""
    before = reference.get("embed_std_mean", 0.0)
    return stats["embed_std_mean"] / before if before > 0 else math.inf


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
    advice = COLLAPSE_ADVICE.get(method, "lower pretrain.lr or check the augmentations")
    return (
        f"embeddings are collapsing: mean per-dimension std {stats['embed_std_mean']:.2e} is {ratio:.2f}x that of "
        f"the encoder before pretraining ({reference['embed_std_mean']:.2e}){knn_text}; {advice}"
    )


# -------------------------------------------------------------------------------------------- k-NN
def knn_accuracy(
    train_vectors: np.ndarray,
    train_labels: np.ndarray,
    query_vectors: np.ndarray,
    query_labels: np.ndarray,
    k: int = 5,
) -> float:
    """Accuracy of a cosine k-NN vote (``k = min(k, N_train)``) of the queries against the train embeddings."""
    if len(train_vectors) == 0 or len(query_vectors) == 0:
        raise ValueError("k-NN needs train and query embeddings")
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_vectors)), metric="cosine", algorithm="brute")
    knn.fit(train_vectors, train_labels)
    return float((knn.predict(query_vectors) == query_labels).mean())


def knn_metrics(train: Embeddings, val: Embeddings, k: int = 5) -> dict[str, float]:
    """``knn_accuracy`` (mean over class targets) and ``knn_accuracy_<target>`` when there are several."""
    names = [name for name in train.labels if name in val.labels]
    if not names or len(train.vectors) == 0 or len(val.vectors) == 0:
        return {}
    per_target = {
        name: knn_accuracy(train.vectors, train.labels[name], val.vectors, val.labels[name], k)
        for name in names
    }
    chance = [majority_share(val.labels[name]) for name in names]
    out = {"knn_accuracy": float(np.mean(list(per_target.values()))), "knn_chance": float(np.mean(chance))}
    out["knn_margin"] = math.sqrt(out["knn_chance"] * (1.0 - out["knn_chance"]) / len(val.vectors))
    if len(per_target) > 1:
        out |= {f"knn_accuracy_{name}": value for name, value in per_target.items()}
    return out


def majority_share(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent class: a k-NN vote's chance level."""
    return float(np.bincount(np.asarray(labels, dtype=np.int64)).max() / len(labels))


# ------------------------------------------------------------------------------------------ verdict
@dataclass
class CollapseVerdict:
    """The collapse check's verdict after an epoch: spread against the encoder before pretraining, and the
    online k-NN against chance (``knn_chance`` + one binomial standard error ``knn_margin`` of the val set).

    Failed: the spread fell below ``share`` of its value before (collapsed), or the k-NN is at chance while
    the untrained encoder's was above it (pretraining lost what random weights saw), or it was at chance at
    the previous verdict too (it stays there)."""

    epoch: int  # 1-based
    spread_ratio: float
    share: float  # pretrain.collapse_ratio
    knn_accuracy: float | None = None
    knn_before: float | None = None
    knn_chance: float | None = None
    knn_margin: float = 0.0
    knn_was_at_chance: bool = False  # at the previous verdict of this run

    @property
    def collapsed(self) -> bool:
        return self.spread_ratio < self.share

    @property
    def knn_at_chance(self) -> bool:
        return (
            self.knn_accuracy is not None
            and self.knn_chance is not None
            and (self.knn_accuracy <= self.knn_chance + self.knn_margin)
        )

    @property
    def knn_failed(self) -> bool:
        above_before = (
            self.knn_before is not None
            and self.knn_chance is not None
            and (self.knn_before > self.knn_chance + self.knn_margin)
        )
        return self.knn_at_chance and (above_before or self.knn_was_at_chance)

    @property
    def failed(self) -> bool:
        return self.collapsed or self.knn_failed

    def line(self, method: str) -> str:
        """The verdict in one line; a failed one names what is wrong and what controls it in ``method``."""
        knn = ""
        if self.knn_accuracy is not None:
            knn = f", online k-NN {self.knn_accuracy:.2f}"
            if self.knn_chance is not None:
                knn += f" (chance {self.knn_chance:.2f} + {self.knn_margin:.2f}"
                knn += f", untrained {self.knn_before:.2f})" if self.knn_before is not None else ")"
        head = f"collapse check after epoch {self.epoch}: spread {self.spread_ratio:.2f}x the untrained encoder's{knn}"
        if not self.failed:
            return f"{head}: not collapsed"
        what = [f"COLLAPSED below {self.share:g}x" if self.collapsed else "",
                "k-NN fell to chance" if self.knn_failed and not self.knn_was_at_chance else "",
                "k-NN stays at chance" if self.knn_failed and self.knn_was_at_chance else ""]  # fmt: skip
        advice = COLLAPSE_ADVICE.get(method, "lower pretrain.lr or check the augmentations")
        return f"{head}: {' and '.join(w for w in what if w)}; {advice}"

    def metrics(self) -> dict[str, float]:
        """The figures for the epoch's history row (``val_collapse_*``), results.json and the report."""
        return {
            "collapse_spread_ratio": self.spread_ratio,
            "collapse_collapsed": float(self.collapsed),
            "collapse_knn_at_chance": float(self.knn_at_chance),
            "collapse_failed": float(self.failed),
        }


def collapse_verdict(
    metrics: dict[str, float], reference: dict[str, float], epoch: int, share: float, knn_was_at_chance: bool
) -> CollapseVerdict:
    """The verdict from one monitoring pass's ``metrics`` (collapse stats, k-NN) and ``calibrate``'s reference."""
    return CollapseVerdict(
        epoch=epoch,
        spread_ratio=std_ratio(metrics, reference),
        share=share,
        knn_accuracy=metrics.get("knn_accuracy"),
        knn_before=reference.get("knn_accuracy"),
        knn_chance=metrics.get("knn_chance"),
        knn_margin=metrics.get("knn_margin", 0.0),
        knn_was_at_chance=knn_was_at_chance,
    )


def verdicts_in(history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The collapse verdicts a run gave (epoch and figures), from its history rows: for results.json."""
    keys = ("val_embed_std_ratio", "val_knn_accuracy", "val_knn_chance")
    return [
        {
            "epoch": row["epoch"],
            **{k[len("val_") :]: row[k] for k in row if k.startswith("val_collapse_") or k in keys},
        }
        for row in history
        if "val_collapse_failed" in row
    ]


@dataclass
class CollapseCheck:
    """When the verdict is due and what it says, for one run (``pretrain.collapse_*``, ``stop_on_collapse``)."""

    enabled: bool
    early_epoch: int  # 1-based: the first verdict; the last comes after the last epoch
    epochs: int
    share: float
    method: str
    stop: bool
    monitor_every: int = 0  # with monitoring on, a verdict at every monitored epoch after the first verdict too
    knn_was_at_chance: bool = False  # at this run's previous verdict

    @classmethod
    def from_settings(cls, settings: Any) -> CollapseCheck:
        return cls(settings.collapse_check, settings.collapse_check_epoch, settings.epochs, settings.collapse_ratio,
                   settings.method, settings.stop_on_collapse, settings.monitor_every)  # fmt: skip

    def due(self, epoch: int, reference: dict[str, float]) -> bool:
        """After the early epoch, after the last (0-based ``epoch``), and after every monitored epoch in between
        (a BYOL run at the reporter's size of issue 29 was healthy at epoch 3, 1.8x, and collapsing at 6, 0.27x)."""
        done = epoch + 1
        monitored = self.monitor_every > 0 and done > self.early_epoch and done % self.monitor_every == 0
        return self.enabled and bool(reference) and (done in (self.early_epoch, self.epochs) or monitored)

    def judge(self, epoch: int, metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
        """This epoch's verdict, logged (a failed one loudly, with what to do), as history figures."""
        verdict = collapse_verdict(metrics, reference, epoch + 1, self.share, self.knn_was_at_chance)
        self.knn_was_at_chance = verdict.knn_at_chance
        line = verdict.line(self.method)
        if not verdict.failed:
            log(line)
        elif self.stop:
            log(f"warning: !!! {line}; stopping here: pretrain.stop_on_collapse = true")
        else:
            log(f"warning: !!! {line}; pretrain.stop_on_collapse = true stops such a run here")
        return verdict.metrics()


SHORTCUT_EPOCHS = 3  # the first epochs, in which a pretext head that solves its task at once has cheated
SHORTCUT_SHARE = 0.5  # a pretext loss below this share of chance is "far below"
STALLED_SHARE = 0.7  # the BYOL loss has not improved (much) while it stays above this share of its first epoch's
SHORTCUT_CAUSES = {
    "rotation": "the orientation of a smooth bias field or a brighter side (a receive coil), the volume's borders "
    "or padding, not the anatomy",
    "jigsaw": "intensity gradients across the blocks (a bias field), the volume's borders or padding, or edge "
    "continuity between blocks, not the anatomy",
}


@dataclass
class EpochWatch:
    """``fit``'s ``stop_when``: after every epoch, a warning for pretext heads that solved their task at once
    while BYOL stalled (a shortcut), and the stop under ``pretrain.stop_on_collapse`` at a failed verdict."""

    method: str
    chance: dict[str, float]  # "loss_rotation" -> ln 4 ...: the method's chance_losses()
    stop_on_collapse: bool
    first_byol: float | None = None
    warned: set[str] = field(default_factory=set)

    def __call__(self, record: dict[str, float]) -> str:
        self.warn_shortcuts(record)
        if self.stop_on_collapse and record.get("val_collapse_failed"):
            return f"the collapse check failed after epoch {int(record['epoch'])}"
        return ""

    def warn_shortcuts(self, record: dict[str, float]) -> list[str]:
        """The shortcut warnings of this epoch (logged on rank 0), each head at most once per run."""
        byol = record.get("train_loss_byol")
        self.first_byol = byol if self.first_byol is None else self.first_byol
        if byol is None or record["epoch"] > SHORTCUT_EPOCHS:
            return []
        lines = []
        for key, level in self.chance.items():
            head, loss = key.removeprefix("loss_"), record.get(f"train_{key}")
            if (
                head in self.warned
                or loss is None
                or loss >= SHORTCUT_SHARE * level
                or byol < STALLED_SHARE * self.first_byol
            ):
                continue
            self.warned.add(head)
            lines.append(
                f"warning: the {head} head is at loss {loss:.3f} after epoch {int(record['epoch'])}, far below chance "
                f"({level:.2f}), while the BYOL loss has not improved ({self.first_byol:.3f} -> {byol:.3f}): it most "
                f"likely solves {head} from a shortcut: {SHORTCUT_CAUSES.get(head, 'a global cue')}; keep "
                f"pretrain.{self.method}.pretext_reorient > 0, crop borders away (pretrain.{self.method}.view_crop_scale), "
                f"or set pretrain.{self.method}.{head}_weight = 0"
            )
        if is_rank0():
            for line in lines:
                log(line)
        return lines


# ------------------------------------------------------------------------------------------ figures
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
