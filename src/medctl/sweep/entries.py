"""What a sweep runs: the checkpoints it finds, one named entry per (checkpoint, kind), and each entry's config.

An entry is a normal ``medctl finetune`` run in ``<sweep dir>/<entry name>/``:

- ``<stem>``: the linear probe of a checkpoint (names from file stems, deduplicated ``<stem>_2``, ...);
  ``medctl pretrain``'s export, ``runs/<run>/checkpoints/encoder.ckpt``, is named after its run;
- ``random_init``: the same probe on a randomly initialised encoder (``sweep.random_baseline``); under
  ``model.encoder = "auto"`` it has the architecture of the first checkpoint whose architecture reads;
- ``<stem>_ft`` / ``random_init_ft``: a fine-tune (the encoder trains from epoch
  ``sweep.finetune_unfreeze_at_epoch``, with ``sweep.finetune_overrides`` on top).

With ``sweep.seeds = [s, ...]`` every entry runs once per seed, in ``<entry>/seed<s>/``: ``run.seed = s``
(the probe's head initialisation and batch order, and the random baseline's initial weights), and a
``{seed}`` in a checkpoint path becomes ``s`` (``runs/byol_s{seed}/checkpoints/encoder.ckpt``), so seed
``s`` of a pretrained entry pairs pretraining seed ``s`` with probe seed ``s``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medctl.config import Config, apply_overrides
from medctl.errors import ConfigError, DataError, MedctlError

PROBE, FINETUNE = "linear_probe", "finetune"
RANDOM_INIT = "random_init"
INNER_SPLIT_FILE = "inner_split.csv"  # sweep.select_on = "inner_val": the carved train split, in the sweep dir


@dataclass(frozen=True)
class SweepEntry:
    """One run of the sweep: ``checkpoint`` is "" for the random-initialisation baseline."""

    name: str
    checkpoint: str
    kind: str  # "linear_probe" | "finetune"
    architecture_of: str = ""  # random baseline under model.encoder = "auto": the file whose architecture it has
    seed: int | None = None  # sweep.seeds: run.seed of this run; None keeps run.seed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SweepEntry:
        seed = value.get("seed")
        return cls(
            str(value["name"]),
            str(value["checkpoint"]),
            str(value["kind"]),
            str(value.get("architecture_of", "")),
            None if seed is None else int(seed),
        )

    @property
    def base(self) -> str:
        """The entry's name without its seed: ``byol/seed1`` -> ``byol``; the leaderboard row it joins."""
        return self.name.split("/")[0]


# ------------------------------------------------------------------------------------- checkpoints
def find_checkpoints(config: Config, *, all_checkpoints: bool = True) -> list[str]:
    """``sweep.checkpoints`` in their order, then (with ``all_checkpoints``) the sorted files of
    ``sweep.checkpoint_dir`` matching ``sweep.checkpoint_glob``; one path once.

    Listed files are kept even when missing (their entry fails with the reason; the others run).
    Nothing found is a DataError naming both keys.
    """
    sweep = config.sweep
    found = list(sweep.checkpoints)
    if all_checkpoints and sweep.checkpoint_dir:
        folder = Path(sweep.checkpoint_dir).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"sweep.checkpoint_dir = {sweep.checkpoint_dir!r} is not a folder; point it at the folder holding "
                "the checkpoints (or list them in sweep.checkpoints)"
            )
        found += [str(p) for p in sorted(folder.glob(sweep.checkpoint_glob)) if p.is_file()]
    unique: dict[Path, str] = {}
    for path in found:
        unique.setdefault(Path(path).expanduser().resolve(), path)
    if not unique:
        where = (
            f"no file matches {sweep.checkpoint_glob!r} in sweep.checkpoint_dir = {sweep.checkpoint_dir!r}"
            if all_checkpoints and sweep.checkpoint_dir
            else "sweep.checkpoints is empty and sweep.checkpoint_dir is not set"
        )
        hint = "" if all_checkpoints else " (the folder is read with --all-checkpoints)"
        raise DataError(
            f"no checkpoints to sweep: {where}; list files in sweep.checkpoints or set sweep.checkpoint_dir"
            f" (and sweep.checkpoint_glob){hint}"
        )
    return list(unique.values())


def entry_names(checkpoints: Sequence[str], reserved: Iterable[str] = (RANDOM_INIT,)) -> list[str]:
    """A file-safe, unique name per checkpoint from its stem: ``a/best.pt``, ``b/best.pt`` -> best, best_2;
    ``runs/byol/checkpoints/encoder.ckpt`` -> byol (the run's name)."""
    taken = set(reserved)
    names = []
    for path in checkpoints:
        stem = checkpoint_label(Path(path)).replace("{seed}", "")  # a template names the runs of every seed
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-") or "checkpoint"
        name, i = stem, 2
        while name in taken:
            name, i = f"{stem}_{i}", i + 1
        taken.add(name)
        names.append(name)
    return names


def checkpoint_label(path: Path) -> str:
    """What a checkpoint is called: its run's name for ``medctl pretrain``'s ``<run>/checkpoints/encoder.ckpt``
    (every such file has the stem "encoder"), else its stem."""
    if path.name == "encoder.ckpt" and path.parent.name == "checkpoints" and path.parent.parent.name:
        return path.parent.parent.name
    return path.stem


def plan_entries(config: Config, checkpoints: Sequence[str], kind: str) -> list[SweepEntry]:
    """One entry of ``kind`` per checkpoint, then the random baseline when ``sweep.random_baseline``
    (under ``model.encoder = "auto"``: of the first checkpoint's architecture that reads); with
    ``sweep.seeds``, one per checkpoint and seed (see the module docstring)."""
    suffix = "_ft" if kind == FINETUNE else ""
    entries = [
        SweepEntry(f"{name}{suffix}", path, kind)
        for name, path in zip(entry_names(checkpoints), checkpoints, strict=True)
    ]
    if config.sweep.random_baseline:
        source = baseline_architecture(config, checkpoints)
        entries.append(SweepEntry(f"{RANDOM_INIT}{suffix}", "", kind, source))
    return [seeded for entry in entries for seeded in with_seeds(entry, config.sweep.seeds)]


def with_seeds(entry: SweepEntry, seeds: Sequence[int]) -> list[SweepEntry]:
    """``entry`` once per seed (``<name>/seed<s>``, ``{seed}`` filled in its paths); as is without seeds."""
    if not seeds:
        return [entry]
    return [
        SweepEntry(
            f"{entry.base}/seed{s}",
            entry.checkpoint.replace("{seed}", str(s)),
            entry.kind,
            entry.architecture_of.replace("{seed}", str(s)),
            s,
        )
        for s in seeds
    ]


def baseline_architecture(config: Config, checkpoints: Sequence[str]) -> str:
    """The checkpoint whose architecture an ``auto`` random baseline takes: the first that reads ("" when
    ``model.encoder`` is named). None reads: the first, so that the baseline fails with its reason."""
    from medctl.models.architecture import AUTO, read_architecture  # torch loads only when a sweep plans

    if config.model.encoder != AUTO:
        return ""
    for path in checkpoints:
        try:
            read_architecture(path, config.model.checkpoint_key)
        except MedctlError:
            continue
        return path
    return checkpoints[0] if checkpoints else ""


def finetune_of(entry: SweepEntry) -> SweepEntry:
    """The fine-tune entry of a probe entry: ``<name>_ft`` (``<name>_ft/seed<s>``) on the same checkpoint."""
    name = f"{entry.base}_ft" + (f"/seed{entry.seed}" if entry.seed is not None else "")
    return SweepEntry(name, entry.checkpoint, FINETUNE, entry.architecture_of, entry.seed)


# ------------------------------------------------------------------------------------------ configs
def sweep_dir_of(config: Config) -> Path:
    """``<run.root>/<run.name>``: the sweep's folder, which holds one folder per entry."""
    return Path(config.run.root) / (config.run.name or "sweep")


def entry_config(config: Config, entry: SweepEntry) -> Config:
    """The sweep's config with this entry's checkpoint and kind (probe: frozen encoder throughout); under
    ``sweep.select_on = "inner_val"`` the entry fits and picks its epoch on the sweep's inner split.

    Fine-tunes: ``model.unfreeze_at_epoch = sweep.finetune_unfreeze_at_epoch`` then
    ``sweep.finetune_overrides``. Every problem is one ConfigError naming the sweep key.
    """
    values: dict[str, Any] = {"model.checkpoint": entry.checkpoint, "model.freeze_encoder": True}
    if entry.architecture_of:
        values["model.architecture_from"] = entry.architecture_of
    if entry.seed is not None:
        values["run.seed"] = entry.seed
    if config.sweep.select_on == "inner_val":
        values["train.inner_split"] = str(sweep_dir_of(config) / INNER_SPLIT_FILE)
    problems: list[str] = []
    overrides: list[str] = []
    if entry.kind == FINETUNE:
        values["model.unfreeze_at_epoch"] = config.sweep.finetune_unfreeze_at_epoch
        values["train.grid"] = {}  # a grid selects probe heads; a fine-tune trains its encoder with one
        for item in config.sweep.finetune_overrides:
            if item.partition("=")[0].strip().split(".")[0] in ("data", "run", "sweep"):
                problems.append(
                    f"`{item.partition('=')[0].strip()}`: fine-tune overrides may not change data.*, run.* or "
                    "sweep.* (every entry reads the same cache); set it for the whole sweep instead"
                )
            else:
                overrides.append(item)
    else:
        values["model.unfreeze_at_epoch"] = -1
    resolved = None
    try:
        resolved = apply_overrides(config, overrides, values=values)
    except ConfigError as exc:
        problems += exc.problems
    if (
        resolved is not None
        and entry.kind == FINETUNE
        and resolved.model.unfreeze_at_epoch > resolved.train.epochs
    ):
        problems.append(
            f"sweep.finetune_unfreeze_at_epoch = {resolved.model.unfreeze_at_epoch} is after the last epoch "
            f"({resolved.train.epochs}), so the encoder would never train; lower it or raise train.epochs"
        )
    if problems or resolved is None:
        raise ConfigError(problems, "sweep.finetune_overrides" if entry.kind == FINETUNE else "sweep")
    return resolved
