"""Is pretraining learning anything? The monitor a run carries: collapse checks and their verdict, figures.

Everything runs on fixed, seeded subsets of the train and val splits (``pretrain.monitor_samples``
each), embedded with the method's online encoder in eval mode without gradients; what is measured on them
(collapse statistics, the online k-NN) is :mod:`medctl.pretrain.embeddings`, the figures (t-SNE,
reconstruction panels, the loss curve) :mod:`medctl.pretrain.figures`.

- collapse: an absolute threshold on the embeddings' spread cannot tell a good encoder from a bad one
  (mean-pooled tokens, or GroupNorm + ReLU maps, sit far below ``1 / sqrt(D)`` at any stage), so the check
  is calibrated: :func:`calibrate` measures the same encoder before pretraining (its random initialisation,
  or ``model.checkpoint``), every check reports ``embed_std_ratio`` (now / before), and a warning is logged
  only when the representation is worse than before: the ratio below ``COLLAPSE_RATIO`` and, where labels
  allow a k-NN, its accuracy no better than before. The advice names what controls collapse in that method
  (:data:`COLLAPSE_ADVICE`).
- the collapse verdict (:class:`CollapseCheck`, on by default and with monitoring off too): after
  ``pretrain.collapse_check_epoch`` epochs and after the last, the spread against the calibrated reference and
  the online k-NN against chance (:class:`CollapseVerdict`); a failed one is a loud warning, and ends the run
  under ``pretrain.stop_on_collapse`` (:class:`EpochWatch`, ``fit``'s ``stop_when``), which also warns when a
  pretext head solves its task in the first epochs while BYOL stalls (a shortcut).

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

from medctl.analysis.proportions import above_chance, format_p
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


def collapse_advice(method: str) -> str:
    """What controls a shrinking representation in ``method``, for the warning and the verdict lines."""
    return COLLAPSE_ADVICE.get(method, "lower pretrain.lr or check the augmentations")


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


# ------------------------------------------------------------------------------------------ verdict
KNN_BLIND = " (k-NN at chance like the untrained encoder's: spread alone)"
KNN_ALPHA = 0.05  # a k-NN is "above chance" when its one-sided exact binomial p is below this
# A spread below this share of the untrained encoder's, yet above pretrain.collapse_ratio, is not a collapse
# but is named (issue 29's bar for a healthy run): BYOL's defaults at the reporter's size settled at 0.33x on
# one seed of three for the last 14 of 30 epochs, and nothing said so (RESULTS.md).
SHRUNK_SHARE = 0.5


@dataclass
class CollapseVerdict:
    """The collapse check's verdict after an epoch: spread against the encoder before pretraining, and the
    online k-NN against chance (``knn_chance``, the majority share), each k-NN by the one-sided exact binomial
    test of its ``knn_n`` votes at :data:`KNN_ALPHA`.

    Failed: the spread fell below ``share`` of its value before (collapsed), or the k-NN is not above chance
    while the untrained encoder's was significantly above it (pretraining lost what random weights saw;
    "stays" when it was at chance at the previous verdict too). When the untrained encoder was not above
    chance either, k-NN cannot tell a collapse on this task (a healthy BYOL run on the count family sits there
    for 30 epochs, RESULTS.md): the line says so and the spread alone decides. (The rule was chance plus one
    standard error before: with 24 val votes, 9 right counted as above chance, and two healthy runs whose
    untrained encoder had 10 of 24 by luck were failed while their spread grew; RESULTS.md.)"""

    epoch: int  # 1-based
    spread_ratio: float
    share: float  # pretrain.collapse_ratio
    knn_accuracy: float | None = None
    knn_before: float | None = None
    knn_chance: float | None = None
    knn_n: int = 0  # val votes behind each k-NN accuracy; 0 (unknown): k-NN decides nothing
    knn_was_at_chance: bool = False  # at the previous verdict of this run

    @property
    def collapsed(self) -> bool:
        return self.spread_ratio < self.share

    @property
    def shrunk(self) -> bool:
        """Not collapsed, but below :data:`SHRUNK_SHARE` of the untrained spread: a warning, never a failure."""
        return not self.collapsed and self.spread_ratio < SHRUNK_SHARE

    def p_above_chance(self, accuracy: float | None) -> float | None:
        """One-sided exact binomial p that ``accuracy`` of the ``knn_n`` votes beats chance (several class
        targets: their mean accuracy, counted as votes); None when untested."""
        if accuracy is None or self.knn_chance is None or self.knn_n < 1:
            return None
        return above_chance(round(accuracy * self.knn_n), self.knn_n, self.knn_chance)

    @property
    def knn_at_chance(self) -> bool:
        p = self.p_above_chance(self.knn_accuracy)
        return p is not None and p >= KNN_ALPHA

    @property
    def knn_before_above_chance(self) -> bool:
        p = self.p_above_chance(self.knn_before)
        return p is not None and p < KNN_ALPHA

    @property
    def knn_failed(self) -> bool:
        return self.knn_at_chance and self.knn_before_above_chance

    @property
    def failed(self) -> bool:
        return self.collapsed or self.knn_failed

    def line(self, method: str) -> str:
        """The verdict in one line; a failed one names what is wrong and what controls it in ``method``."""
        knn = ""
        if self.knn_accuracy is not None:
            knn = f", online k-NN {self.knn_accuracy:.2f}"
            p_now, p_before = self.p_above_chance(self.knn_accuracy), self.p_above_chance(self.knn_before)
            if p_now is not None:
                knn += f" (chance {self.knn_chance:.2f}, {format_p(p_now)} above it"
                knn += f"; untrained {self.knn_before:.2f}, {format_p(p_before)})" if p_before is not None else ")"
        head = f"collapse check after epoch {self.epoch}: spread {self.spread_ratio:.2f}x the untrained encoder's{knn}"
        if not self.failed:
            knn_blind = self.knn_at_chance and not self.knn_before_above_chance
            shrunk = f", but shrunk below {SHRUNK_SHARE:g}x (a partial collapse)" if self.shrunk else ""
            return f"{head}: not collapsed{shrunk}" + (KNN_BLIND if knn_blind else "")
        what = [f"COLLAPSED below {self.share:g}x" if self.collapsed else "",
                "k-NN fell to chance" if self.knn_failed and not self.knn_was_at_chance else "",
                "k-NN stays at chance" if self.knn_failed and self.knn_was_at_chance else ""]  # fmt: skip
        advice = collapse_advice(method)
        return f"{head}: {' and '.join(w for w in what if w)}; {advice}"

    def metrics(self) -> dict[str, float]:
        """The figures for the epoch's history row (``val_collapse_*``), results.json and the report."""
        return {
            "collapse_spread_ratio": self.spread_ratio,
            "collapse_collapsed": float(self.collapsed),
            "collapse_knn_at_chance": float(self.knn_at_chance),
            "collapse_shrunk": float(self.shrunk),
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
        knn_n=int(metrics.get("knn_n", 0)),
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
        if verdict.shrunk and not verdict.failed:
            advice = collapse_advice(self.method)
            log(f"warning: {line}; {advice}")
        elif not verdict.failed:
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
