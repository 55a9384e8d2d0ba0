"""After an epoch: the collapse verdict, and the shortcut watch that can end a run.

- the collapse verdict (:class:`CollapseVerdict`, on by default and with monitoring off too): after
  ``pretrain.collapse_check_epoch`` epochs and after the last, the spread and the effective rank against the
  calibrated reference of :func:`medctl.pretrain.monitoring.calibrate`, and the online k-NN against chance; a
  failed one is a loud warning, and ends the run under ``pretrain.stop_on_collapse`` (:class:`EpochWatch`,
  ``fit``'s ``stop_when``), which also warns when a pretext head solves its task in the first epochs while BYOL
  stalls (a shortcut).
- what controls collapse in each method (:data:`COLLAPSE_ADVICE`), for the verdict and the monitor's warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medctl.analysis.proportions import above_chance, format_p
from medctl.pretrain.embeddings import rank_ratio, std_ratio
from medctl.progress import log
from medctl.training.distributed import is_rank0

COLLAPSE_ADVICE = {
    "byol": "the EMA target is what keeps BYOL apart: raise pretrain.ema_momentum (e.g. 0.996) or lower pretrain.lr; "
    "a falling effective rank (a dimensional collapse) is what pretrain.byol.decorrelation_weight counters: raise it",
    "jepa": "the EMA target encoder moves too fast: raise pretrain.ema_momentum (e.g. 0.999) or lower pretrain.lr; "
    "smaller target blocks (pretrain.jepa.mask_block_scale) make the prediction easier to learn",
    "mim_contrastive": "InfoNCE spreads the projections, not the pooled embedding: raise pretrain.mim_contrastive.contrastive_weight "
    "relative to pretrain.mim_contrastive.mim_weight, raise data.batch_size (more negatives) or lower pretrain.lr",
}


def collapse_advice(method: str) -> str:
    """What controls a shrinking representation in ``method``, for the warning and the verdict lines."""
    return COLLAPSE_ADVICE.get(method, "lower pretrain.lr or check the augmentations")


# ------------------------------------------------------------------------------------------ verdict
KNN_BLIND = " (k-NN at chance like the untrained encoder's: spread and rank alone)"
KNN_ALPHA = 0.05  # a k-NN is "above chance" when its one-sided exact binomial p is below this
# A spread below this share of the untrained encoder's, yet above pretrain.collapse_ratio, is not a collapse
# but is named (issue 29's bar for a healthy run): BYOL's defaults at the reporter's size settled at 0.33x on
# one seed of three for the last 14 of 30 epochs, and nothing said so (RESULTS.md).
SHRUNK_SHARE = 0.5
# An effective rank below this share of the untrained encoder's, yet above pretrain.collapse_ratio, is named a
# dimensional collapse (a warning). Measured on 24 val volumes: BYOL on mt3 at the reporter's size fell to
# 0.10-0.18x from epoch 3 to 30 while its spread read 0.27-6.8x; the demo's BYOL runs keep 0.69-0.81x
# (RESULTS.md).
RANK_SHRUNK_SHARE = 0.25
# A spread below SHRUNK_SHARE is not named while the effective rank keeps at least this share: the embeddings
# then vary along as many directions as before, only less against their common mean, and adding a constant to
# every embedding changes neither a standardised probe nor the rank. BYOL with its decorrelation term on mt3
# at the reporter's size ends at a spread of 0.29-0.49x and a rank of 0.86-0.99x on val (RESULTS.md).
RANK_HELD_SHARE = 0.5


@dataclass
class CollapseVerdict:
    """The collapse check's verdict after an epoch: spread and effective rank against the encoder before
    pretraining, and the online k-NN against chance (``knn_chance``, the majority share), each k-NN by the
    one-sided exact binomial test of its ``knn_n`` votes at :data:`KNN_ALPHA`.

    Failed: the spread or the effective rank fell below ``share`` of its value before (collapsed: the rank
    catches a dimensional collapse whose spread looks healthy, :mod:`medctl.pretrain.embeddings`), or the k-NN
    is not above chance while the untrained encoder's was significantly above it (pretraining lost what random
    weights saw; "stays" when it was at chance at the previous verdict too). When the untrained encoder was not
    above chance either, k-NN cannot tell a collapse on this task (a healthy BYOL run on the count family sits
    there for 30 epochs, RESULTS.md): the line says so and the spread and rank alone decide. (The rule was
    chance plus one standard error before: with 24 val votes, 9 right counted as above chance, and two healthy runs whose
    untrained encoder had 10 of 24 by luck were failed while their spread grew; RESULTS.md.)"""

    epoch: int  # 1-based
    spread_ratio: float
    share: float  # pretrain.collapse_ratio
    knn_accuracy: float | None = None
    knn_before: float | None = None
    knn_chance: float | None = None
    knn_n: int = 0  # val votes behind each k-NN accuracy; 0 (unknown): k-NN decides nothing
    knn_was_at_chance: bool = False  # at the previous verdict of this run
    rank_ratio: float = math.inf  # effective rank over the untrained encoder's (inf: not measured before)
    rank: float | None = None  # the effective rank now

    @property
    def spread_collapsed(self) -> bool:
        return self.spread_ratio < self.share

    @property
    def rank_collapsed(self) -> bool:
        return self.rank_ratio < self.share

    @property
    def collapsed(self) -> bool:
        return self.spread_collapsed or self.rank_collapsed

    @property
    def spread_low(self) -> bool:
        """Below :data:`SHRUNK_SHARE` of the untrained spread, collapsed or not."""
        return self.spread_ratio < SHRUNK_SHARE

    @property
    def rank_held(self) -> bool:
        """The effective rank was measured and kept :data:`RANK_HELD_SHARE` of the untrained encoder's."""
        return math.isfinite(self.rank_ratio) and self.rank_ratio >= RANK_HELD_SHARE

    @property
    def spread_shrunk(self) -> bool:
        """Not collapsed, below :data:`SHRUNK_SHARE` of the untrained spread, and the rank did not hold."""
        return not self.collapsed and self.spread_low and not self.rank_held

    @property
    def rank_shrunk(self) -> bool:
        """Not collapsed, but below :data:`RANK_SHRUNK_SHARE` of the untrained effective rank."""
        return not self.collapsed and self.rank_ratio < RANK_SHRUNK_SHARE

    @property
    def shrunk(self) -> bool:
        """A partial or dimensional collapse: a warning, never a failure."""
        return self.spread_shrunk or self.rank_shrunk

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
        rank = ""
        if self.rank is not None and math.isfinite(self.rank_ratio):
            rank = f", effective rank {self.rank:.1f} ({self.rank_ratio:.2f}x)"
        head = f"collapse check after epoch {self.epoch}: spread {self.spread_ratio:.2f}x the untrained encoder's{rank}{knn}"
        if not self.failed:
            knn_blind = self.knn_at_chance and not self.knn_before_above_chance
            named = [f"shrunk below {SHRUNK_SHARE:g}x (a partial collapse)" if self.spread_shrunk else "",
                     f"its effective rank fell below {RANK_SHRUNK_SHARE:g}x (a dimensional collapse)"
                     if self.rank_shrunk else ""]  # fmt: skip
            if self.shrunk:
                shrunk = ", but " + " and ".join(n for n in named if n)
            elif self.spread_low and self.rank_held:
                shrunk = (f" (the spread is below {SHRUNK_SHARE:g}x, but the rank held: as many directions vary, "
                          "less against the embeddings' common mean, which a standardised probe does not see)")  # fmt: skip
            else:
                shrunk = ""
            return f"{head}: not collapsed{shrunk}" + (KNN_BLIND if knn_blind else "")
        what = [f"COLLAPSED below {self.share:g}x" if self.spread_collapsed else "",
                f"COLLAPSED to {self.rank:.1f} effective dimensions, below {self.share:g}x the untrained rank"
                if self.rank_collapsed else "",
                "k-NN fell to chance" if self.knn_failed and not self.knn_was_at_chance else "",
                "k-NN stays at chance" if self.knn_failed and self.knn_was_at_chance else ""]  # fmt: skip
        advice = collapse_advice(method)
        return f"{head}: {' and '.join(w for w in what if w)}; {advice}"

    def metrics(self) -> dict[str, float]:
        """The figures for the epoch's history row (``val_collapse_*``), results.json and the report."""
        rank = {"collapse_rank_ratio": self.rank_ratio} if math.isfinite(self.rank_ratio) else {}
        return {
            "collapse_spread_ratio": self.spread_ratio,
            **rank,
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
        rank_ratio=rank_ratio(metrics, reference),
        rank=metrics.get("embed_rank"),
    )


def verdicts_in(history: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The collapse verdicts a run gave (epoch and figures), from its history rows: for results.json."""
    keys = ("val_embed_std_ratio", "val_embed_rank", "val_knn_accuracy", "val_knn_chance")
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
