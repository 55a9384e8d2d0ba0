"""``medctl sweep``: the same probe (and fine-tune) over several checkpoints, on one frozen split, into a leaderboard.

The recipe, top to bottom:

1. the checkpoints (``sweep.checkpoints``, and with ``all_checkpoints`` every ``sweep.checkpoint_glob`` file
   of ``sweep.checkpoint_dir``) and the entries (:mod:`medctl.sweep.entries`); every entry's config is
   resolved before anything runs, so a bad ``sweep.finetune_overrides`` stops the sweep at once;
2. the data, preprocessed once; the hash of its split manifest is the sweep's, and every entry's
   ``results.json`` must carry it (otherwise the entry's row fails); with ``sweep.select_on = "inner_val"``
   the train split is carved once into inner_train / inner_val (``inner_split.csv``, :mod:`medctl.sweep.state`)
   and every entry fits on the first and picks its epoch on the second;
3. the entries, each a normal run directory ``<run.root>/<run.name>/<entry>/`` made by
   :func:`medctl.finetune.run_finetune` and then evaluated on val and test by
   :func:`medctl.evaluate.stage.run_evaluate` (``eval_val/``, ``eval_test/``); a finished entry
   (``done.json``) is skipped, a failed one retried, an interrupted one resumed from its ``last.ckpt``.
   One failing entry never stops the others: its row says why. ``jobs > 1`` runs entries in spawned
   processes, each pinned to one GPU (round-robin) or, on CPU, to its share of the cores;
4. mode ``both``: the probes first, then fine-tunes of the ``sweep.finetune_top`` pretrained checkpoints
   best on the selection split (val, or the inner val of ``select_on = "inner_val"``) by the ranking metric
   (mean over seeds);
5. ``leaderboard.csv`` and ``leaderboard.md`` (:mod:`medctl.sweep.records`) with every target's headline metrics,
   ranked on the ranking metric (``sweep.rank_by``, else ``train.monitor``'s; :func:`medctl.sweep.records.rank_metric`)
   on ``sweep.rank_on`` (test by default: val already picked each probe's epoch; with ``select_on = "inner_val"``,
   ``rank_on = "val"`` ranks on samples that selected nothing and leaves test untouched), in its direction
   (errors: lower first), and ``sweep_state.json``. With ``sweep.seeds`` each
   entry runs once per seed and its row holds the mean and std over seeds (``leaderboard_seeds.csv`` keeps
   the per-seed rows).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medctl.analysis.ranking import best_first
from medctl.config import SWEEP_MODES, Config
from medctl.data.dataset import split_manifest_hash
from medctl.data.preprocess import preprocess
from medctl.errors import ConfigError
from medctl.io import write_json, write_text_atomic
from medctl.progress import log, progress_bar
from medctl.runs import environment_info, held_run, redact, run_dir_refusal
from medctl.sweep.entries import (
    FINETUNE,
    PROBE,
    RANDOM_INIT,
    SweepEntry,
    entry_config,
    find_checkpoints,
    finetune_of,
    plan_entries,
    sweep_dir_of,
)
from medctl.sweep.jobs import init_worker, now_s, run_entry_job, visible_gpus
from medctl.sweep.records import (
    DEFAULT_RANK,
    SELECTED_ON,
    EntryRecord,
    RankMetric,
    build_leaderboard,
    entry_row,
    failed_row,
    rank_metric,
)
from medctl.sweep.state import (
    DONE_FILE,
    SweepState,
    finished,
    freeze_inner_split,
)
from medctl.tracking import connect


@dataclass
class EntryOutcome:
    """How one entry went in this sweep: ``status`` is done (ran now), skipped (finished before) or failed;
    a finished entry's files are read once, into ``record``."""

    entry: SweepEntry
    run_dir: Path
    status: str
    reason: str = ""
    wall_time_s: float = 0.0
    record: EntryRecord | None = None  # what a finished entry wrote, read once (none when it failed)


@dataclass
class SweepResult:
    """What a sweep produced; ``leaderboard`` is what ``leaderboard.csv`` holds (ranked, failures last)."""

    sweep_dir: Path
    leaderboard: pd.DataFrame
    leaderboard_csv: Path
    leaderboard_md: Path
    outcomes: list[EntryOutcome]
    split_manifest_hash: str
    cache_dir: Path
    mode: str
    wall_time_s: float

    @property
    def failed(self) -> list[EntryOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def run_sweep(
    config: Config,
    *,
    command: str = "",
    all_checkpoints: bool = True,
    mode: str | None = None,
    jobs: int | None = None,
    fresh: bool = False,
) -> SweepResult:
    """Run the sweep ``config`` describes (see the module docstring); ``mode``/``jobs`` override ``[sweep]``.

    ``fresh`` reruns every entry, finished or not. Ctrl-C stops the sweep; what finished is kept and a
    rerun goes on from there.
    """
    start = time.perf_counter()
    mode = mode or config.sweep.mode
    if mode not in SWEEP_MODES:
        raise ConfigError(
            [f"--mode {mode!r} is not a sweep mode; use one of {', '.join(SWEEP_MODES)}"], "sweep.mode"
        )
    jobs = jobs or config.sweep.jobs
    sweep_dir = sweep_dir_of(config)
    tracker = connect(config.tracking, kind="sweep")  # the parent run of every entry's run

    # 1. checkpoints and entries, every entry's config resolved up front
    checkpoints = find_checkpoints(config, all_checkpoints=all_checkpoints)
    first = plan_entries(config, checkpoints, FINETUNE if mode == FINETUNE else PROBE)
    for entry in first + ([finetune_of(first[0])] if mode == "both" else []):
        entry_config(config, entry)
    targets = [(t.name, t.kind) for t in config.data.targets]
    rank = rank_metric(config.sweep.rank_by, config.train.monitor, targets)
    log(f"sweep: {len(checkpoints)} checkpoint(s), mode {mode}, {len(first)} entries first -> {sweep_dir}")

    # 2. the data, once; its split manifest is the sweep's
    cache = preprocess(config.data).cache_dir
    manifest_hash = split_manifest_hash(cache)
    log(f"sweep: cache {cache}, split manifest {manifest_hash}")
    write_sweep_files(config, sweep_dir, command)
    tracker.begin(sweep_dir, resume=not fresh)
    state = SweepState.load(sweep_dir, manifest_hash, mode)
    inner_digest = ""
    if config.sweep.select_on == "inner_val":
        inner_digest = freeze_inner_split(
            sweep_dir, cache, val_share=config.sweep.inner_val_share, seed=config.data.split_seed,
            split_manifest_hash=manifest_hash,
        )  # fmt: skip

    # 3. the first round (probes, or fine-tunes in mode finetune)
    runner = EntryRunner(
        config, sweep_dir, manifest_hash, state, command=command, jobs=jobs, fresh=fresh, inner_split=inner_digest
    )
    outcomes = runner.run(first)

    # 4. mode both: fine-tune the best pretrained probes
    if mode == "both":
        select_on = config.sweep.select_on
        chosen = top_pretrained(outcomes, manifest_hash, config.sweep.finetune_top, rank, select_on)
        pretrained = sum(bool(o.entry.checkpoint) for o in outcomes)
        log(
            f"sweep: fine-tuning {', '.join(e.name for e in chosen) or 'nothing'}: the best {len(chosen)} of the "
            f"{pretrained} pretrained checkpoint(s) by {rank.column(select_on)} "
            f"(sweep.finetune_top = {config.sweep.finetune_top}; "
            f"the {RANDOM_INIT} baseline is not fine-tuned, whatever its rank)"
        )
        outcomes += runner.run([finetune_of(e) for e in chosen])

    # 5. the leaderboard
    rows, records = [], {}
    for outcome in outcomes:
        if outcome.record is None:
            rows.append(failed_row(outcome.entry, outcome.run_dir, outcome.reason))
        else:
            records[outcome.entry.name] = outcome.record
            rows.append(entry_row(outcome.entry, outcome.record, manifest_hash))
    state.entries = {
        o.entry.name: state.entries.get(o.entry.name, {}) for o in outcomes
    }  # only this sweep's entries
    state.save()
    board, csv_path, md_path = build_leaderboard(
        rows,
        records,
        sweep_dir,
        n_bootstrap=config.sweep.bootstrap,
        seed=config.run.seed,
        title=f"Sweep {sweep_dir.name}: {mode}, split manifest {manifest_hash}",
        rank_on=config.sweep.rank_on,
        seeds=config.sweep.seeds,
        rank=rank,
        targets=targets,
        monitor=config.train.monitor,
        selected_on=config.sweep.select_on,
    )
    for entry, overlap in zip(board["entry"], board.get("pretrain_overlap", [""] * len(board)), strict=True):
        if isinstance(overlap, str) and overlap.endswith(" test"):  # Overlap.cell(): "2 val / 1 test"
            log(f"warning: sweep: {entry}: {overlap} participants were in its pretraining pool")
    log(f"sweep: leaderboard -> {md_path}")
    tracker.finish()
    return SweepResult(
        sweep_dir, board, csv_path, md_path, outcomes, manifest_hash, cache, mode, time.perf_counter() - start
    )


def write_sweep_files(config: Config, sweep_dir: Path, command: str) -> None:
    """The sweep folder's resolved ``config.toml`` and secret-free ``env.json``."""
    write_text_atomic(sweep_dir / "config.toml", config.to_toml())
    env = environment_info(Path(config.run.root)) | {"command": redact(command), "seed": config.run.seed}
    write_json(sweep_dir / "env.json", env)


def top_pretrained(
    outcomes: Sequence[EntryOutcome],
    manifest_hash: str,
    k: int,
    rank: RankMetric = DEFAULT_RANK,
    select_on: str = "val",
) -> list[SweepEntry]:
    """Every seed of the ``k`` finished entries with a checkpoint (not the random baseline) that score best
    on the selection split by the ranking metric, in its direction (mean over their seeds), best first: val, or
    with ``select_on = "inner_val"`` the inner val that picked their epochs (``results.json``). Not the ranking
    split: choosing what to fine-tune is a selection, and the ranking split stays out of it."""
    values: dict[str, list[float]] = {}
    seeds: dict[str, list[SweepEntry]] = {}
    column = rank.column(SELECTED_ON)
    for outcome in outcomes:
        if outcome.record is None or not outcome.entry.checkpoint:
            continue
        row = entry_row(outcome.entry, outcome.record, manifest_hash)
        value = row.get(column)
        if select_on == "inner_val":  # the best epoch's metrics on inner val, as the entry's run recorded them
            value = (outcome.record.results.get("metrics") or {}).get(rank.monitored_key)
        if row["status"] == "ok" and value is not None:
            values.setdefault(outcome.entry.base, []).append(float(value))
            seeds.setdefault(outcome.entry.base, []).append(outcome.entry)
    means = {base: sum(v) / len(v) for base, v in values.items()}
    order = best_first(means, rank.metric)  # stable: ties keep order
    return [entry for base in order[:k] for entry in seeds[base]]


# ------------------------------------------------------------------------------------------- entries
class EntryRunner:
    """Runs entries in order (or ``jobs`` at a time in spawned processes), skipping finished ones."""

    def __init__(
        self,
        config: Config,
        sweep_dir: Path,
        manifest_hash: str,
        state: SweepState,
        *,
        command: str,
        jobs: int,
        fresh: bool,
        inner_split: str = "",
    ):
        self.config, self.sweep_dir, self.manifest_hash, self.state = config, sweep_dir, manifest_hash, state
        self.command, self.jobs, self.fresh = command, jobs, fresh
        self.inner_split = inner_split  # the digest of the sweep's inner_split.csv ("" : none)

    def run(self, entries: Sequence[SweepEntry]) -> list[EntryOutcome]:
        outcomes: dict[str, EntryOutcome] = {}
        todo = []
        for entry in entries:
            run_dir = self.sweep_dir / entry.name
            if self.fresh:
                (run_dir / DONE_FILE).unlink(missing_ok=True)
            if finished(run_dir, entry, self.manifest_hash, self.inner_split):
                log(f"sweep: {entry.name} already finished, skipped ({run_dir})")
                outcomes[entry.name] = EntryOutcome(entry, run_dir, "skipped")
                self.state.mark(entry, "done")
            elif self._foreign_run(entry):
                reason = (
                    f"{run_dir} already holds a run that this sweep did not finish ({held_run(run_dir)}; e.g. its "
                    "checkpoint file changed since); replace it with --overwrite (or --fresh), or choose a new run.name"
                )
                log(f"sweep: {entry.name}: {reason}")
                outcomes[entry.name] = EntryOutcome(entry, run_dir, "failed", reason)
                self.state.mark(entry, "refused", reason=reason)
            else:
                todo.append(entry)
        with progress_bar("sweep", total=len(todo)) as bar:
            run = self._in_processes if self.jobs > 1 and len(todo) > 1 else self._in_order
            for outcome in run(todo):
                outcomes[outcome.entry.name] = outcome
                bar.advance(1, info=f"{outcome.entry.name} {outcome.status}")
        for outcome in outcomes.values():
            if outcome.status != "failed":
                outcome.record = EntryRecord.read(outcome.run_dir)
        return [outcomes[e.name] for e in entries]

    def _run_flags(self, entry: SweepEntry) -> tuple[bool, bool]:
        """``(resume, overwrite)`` for the entry's folder, as :func:`medctl.runs.run_dir_refusal` reads them: a
        run this sweep left running or interrupted resumes from its ``last.ckpt``; one it left failed (or
        interrupted before a checkpoint) is replaced, and with --fresh every one is."""
        status = self.state.status(entry.name)
        resume = (
            not self.fresh
            and status in ("running", "interrupted")
            and (self.sweep_dir / entry.name / "checkpoints" / "last.ckpt").is_file()
        )
        return resume, not resume and (self.fresh or status in ("failed", "running", "interrupted"))

    def _foreign_run(self, entry: SweepEntry) -> bool:
        """A run in the entry's folder that this sweep may not replace: the one rule refuses it."""
        resume, overwrite = self._run_flags(entry)
        return bool(run_dir_refusal(self.sweep_dir / entry.name, resume=resume, overwrite=overwrite))

    def _job_args(self, entry: SweepEntry, threads: int = 0) -> dict[str, Any]:
        run_dir = self.sweep_dir / entry.name
        resume, overwrite = self._run_flags(entry)
        config = self.config.model_dump(mode="json")
        if threads:
            config["run"]["threads"] = threads  # this job's share of the cores
        return {
            "config": config,
            "entry": entry.to_dict(),
            "run_dir": str(run_dir),
            "manifest_hash": self.manifest_hash,
            "command": self.command,
            "resume": resume,
            "overwrite": overwrite,
        }

    def _record(self, entry: SweepEntry, result: dict[str, Any]) -> EntryOutcome:
        outcome = EntryOutcome(
            entry,
            self.sweep_dir / entry.name,
            result["status"],
            result.get("reason", ""),
            result["wall_time_s"],
        )
        if outcome.status == "failed":
            log(f"sweep: {entry.name} failed: {outcome.reason}")
            self.state.mark(entry, "failed", reason=outcome.reason, wall_time_s=round(outcome.wall_time_s, 3))
        else:
            log(f"sweep: {entry.name} finished in {outcome.wall_time_s:.1f} s")
            self.state.mark(entry, "done", wall_time_s=round(outcome.wall_time_s, 3))
        return outcome

    def _in_order(self, entries: Sequence[SweepEntry]):
        for entry in entries:
            args = self._job_args(entry)
            log(
                f"sweep: {entry.name} ({entry.kind}, {entry.checkpoint or 'random init'})"
                + (", resuming" if args["resume"] else "")
            )
            self.state.mark(entry, "running", started=now_s())
            try:
                result = run_entry_job(**args)
            except KeyboardInterrupt:
                self.state.mark(entry, "interrupted")
                raise
            yield self._record(entry, result)

    def _in_processes(self, entries: Sequence[SweepEntry]):
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for slot in range(self.jobs):
            slots.put(slot)
        devices = visible_gpus()
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        log(
            f"sweep: {self.jobs} parallel jobs, "
            + (f"GPUs {', '.join(devices)} round-robin" if devices else f"{threads} CPU thread(s) each")
        )
        executor = ProcessPoolExecutor(
            self.jobs, mp_context=context, initializer=init_worker, initargs=(slots, devices, threads)
        )
        running: dict[Future, SweepEntry] = {}
        try:
            for entry in entries:
                self.state.mark(entry, "running", started=now_s())
                job = self._job_args(entry, threads=0 if devices else threads)
                running[executor.submit(run_entry_job, **job)] = entry
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    entry = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # the worker process died (out of memory, killed): a failed row
                        result = {
                            "status": "failed",
                            "reason": f"worker died: {type(exc).__name__}: {exc}",
                            "wall_time_s": 0.0,
                        }
                    yield self._record(entry, result)
        except KeyboardInterrupt:
            for entry in running.values():
                self.state.mark(entry, "interrupted")
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)


