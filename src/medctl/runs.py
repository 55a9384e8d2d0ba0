"""Run directories: ``runs/<name>/`` with the resolved ``config.toml`` and a secret-free ``env.json``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from medctl import __version__
from medctl.config import Config, PretrainConfig, upgrade_saved_tree
from medctl.errors import ConfigError, redact_url_credentials
from medctl.io import remove_stale_temps, write_json, write_text_atomic
from medctl.progress import log

SECRET_PATTERN = re.compile(r"(secret|token|password|passwd|credential|access_key|session_key)", re.I)


# Keys a resumed run may change: where and how fast it runs, never what it computes (reported, not refused);
# [tracking] (where it is reported) is free as well.
RESUME_FREE = ("run.device", "run.threads", "data.num_workers", "data.preprocess.workers", "data.cache_dir",
               "data.download_dir", "train.log_every", "pretrain.log_every", "pretrain.stop_on_collapse")  # fmt: skip
EPOCH_KEYS = ("train.epochs", "pretrain.epochs")  # changed on --resume only with --extend


def run_path(config: Config, run_dir: str | Path | None = None, *, resume: bool = False, stamp: str = "") -> Path:
    """Where a stage's run goes: ``run_dir`` when the caller names it (a sweep entry, the demo), else
    ``<run.root>/<run.name>``, else ``<run.root>/<stamp>`` (an unnamed new run is named by the time: under
    torchrun pass rank 0's). ``--resume`` needs a name: the run to continue."""
    if run_dir is not None:
        return Path(run_dir)
    if resume and not config.run.name:
        raise ConfigError(["--resume needs run.name: the name of the run to continue (runs/<name>/)"], "run.name")
    return Path(config.run.root) / (config.run.name or stamp or timestamp())


def timestamp() -> str:
    """The name of an unnamed run: the time it started, to the second."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def run_dir_refusal(run_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """The one rule of every stage for a run folder, as the reason it refuses ("" when the run may start):

    - new (neither flag): the folder may not hold a run (:func:`held_run`: a ``last.ckpt`` or ``results.json``);
    - ``resume``: it must hold a ``checkpoints/last.ckpt`` to continue (with the run's own settings,
      :func:`check_resume_settings`);
    - ``overwrite``: whatever it holds is deleted first; with ``resume`` it is a contradiction."""
    if resume and overwrite:
        return "--resume continues the run and --overwrite deletes it; pass one of them"
    if resume and not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return (
            f"--resume: {run_dir} holds no checkpoints/last.ckpt to continue; start the run without --resume "
            "(or check run.name and run.root)"
        )
    held = held_run(run_dir)
    if held and not resume and not overwrite:
        return (
            f"{run_dir} already holds a run ({held}); continue it with --resume, choose a new run.name, "
            "or replace it with --overwrite"
        )
    return ""


def claim_run_dir(
    run_dir: Path, config: Config, *, resume: bool, overwrite: bool, extend: bool = False, act: bool = True
) -> None:
    """:func:`run_dir_refusal`'s rule for ``run_dir``, refused with its one line; a resumed run keeps its
    settings (:func:`check_resume_settings`); ``overwrite`` deletes an earlier run. Temp files that a killed
    write left are removed either way.

    ``act=False`` only checks: a stage checks before its long data pass, and the other ranks under torchrun
    leave the deleting to rank 0."""
    if resume:
        check_resume_settings(run_dir, config, extend=extend)
    refusal = run_dir_refusal(run_dir, resume=resume, overwrite=overwrite)
    if refusal:
        raise ConfigError([refusal], "run.name")
    if not act:
        return
    if overwrite and held_run(run_dir):
        log(f"--overwrite: deleting the earlier run in {run_dir}")
        shutil.rmtree(run_dir)
    removed = remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints")
    if removed:
        log(f"removed {len(removed)} temp file(s) left by a killed write in {run_dir}")


def open_run_dir(
    run_dir: Path,
    config: Config,
    command: str = "",
    *,
    resume: bool,
    overwrite: bool,
    extend: bool = False,
    act: bool = True,
) -> Path:
    """The one run-folder opener of every stage: ``run_dir`` claimed (:func:`claim_run_dir`), then the
    resolved ``config.toml`` and a secret-free ``env.json`` written (:func:`create_run_dir`). A new run in a
    folder that an earlier run left without a checkpoint starts its ``metrics.jsonl`` and ``tb/`` afresh
    (they would mix with the old run's); ``resume`` keeps them. ``act=False`` (other ranks) writes nothing."""
    claim_run_dir(run_dir, config, resume=resume, overwrite=overwrite, extend=extend, act=act)
    if act:
        create_run_dir(config, command, run_dir=run_dir)
        if not resume:  # the rule above leaves no last.ckpt or results.json here; the logs of a run without them go
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
    return run_dir


def held_run(run_dir: Path) -> str:
    """What marks ``run_dir`` as holding a run (its ``last.ckpt`` or ``results.json``), or ""."""
    for name in ("checkpoints/last.ckpt", "results.json"):
        if (run_dir / name).is_file():
            return str(run_dir / name)
    return ""


def check_resume_settings(run_dir: Path, config: Config, *, extend: bool) -> None:
    """``--resume`` continues a run with its own settings: a changed key is refused with one line naming
    every one (``--extend`` allows a larger number of epochs); keys in RESUME_FREE are reported only."""
    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        return
    saved_tree, now_tree = upgrade_saved_tree(tomllib.loads(saved_path.read_text())), tomllib.loads(config.to_toml())
    saved, now = flatten(saved_tree), flatten(now_tree)
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    for table in _one_sided_method_tables(saved_tree, now_tree):  # only the pretrain stage completes its table
        changed = {k: v for k, v in changed.items() if not k.startswith(f"pretrain.{table}.")}
    changed.pop("run.root", None), changed.pop("run.name", None)
    free = {
        k: v
        for k, v in changed.items()
        if k in RESUME_FREE or k.startswith("tracking.") or (extend and k in EPOCH_KEYS)
    }
    for key, (old, new) in free.items():
        log(f"--resume: {key} {old!r} -> {new!r}")
    refused = {k: v for k, v in changed.items() if k not in free}
    if not refused:
        return
    shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
    hint = (
        "; pass --extend to train on to the new number of epochs (the lr schedule is re-planned)"
        if set(refused) & set(EPOCH_KEYS)
        else ""
    )
    raise ConfigError(
        [f"--resume continues {run_dir} with the settings it was started with, but these differ: {shown}{hint}; "
         "resume without them (see its config.toml), or start a new run.name (or --overwrite)"],
        "--resume",
    )  # fmt: skip


def _one_sided_method_tables(saved: dict[str, Any], now: dict[str, Any]) -> set[str]:
    """The ``[pretrain.<method>]`` tables one config holds and the other does not."""
    tables = [
        {k for k, v in tree.get("pretrain", {}).items() if isinstance(v, dict) and k not in PretrainConfig.model_fields}
        for tree in (saved, now)
    ]
    return tables[0] ^ tables[1]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def create_run_dir(config: Config, command: str = "", run_dir: Path | None = None) -> Path:
    """Make ``run_dir`` (default :func:`run_path`) and write the resolved config and the environment into it."""
    run_dir = run_dir or run_path(config)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", config.to_toml())
    env = environment_info(Path(config.run.root))
    env.update(command=redact(command), seed=config.run.seed, deterministic=config.run.deterministic)
    write_json(run_dir / "env.json", env)
    return run_dir


TIMING_KEYS = ("wall_time_s", "samples_per_s", "epoch_time_s")  # wall-clock figures: differ every run


def write_results_and_timing(run_dir: Path, results: dict[str, Any]) -> None:
    """``results.json``: what the run computed, with no wall-clock figure, so two deterministic runs
    (``run.deterministic``) write identical bytes; ``timing.json``: what it cost (``wall_time_s``,
    ``samples_per_s``, and per epoch ``samples_per_s`` / ``epoch_time_s``; metrics.jsonl has them too)."""
    history = results.get("history") or []
    computed = {k: v for k, v in results.items() if k not in TIMING_KEYS}
    computed["history"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]
    timing = {k: results[k] for k in TIMING_KEYS if k in results}
    timing["epochs"] = [
        {"epoch": row.get("epoch"), **{k: row[k] for k in TIMING_KEYS if k in row}} for row in history
    ]
    write_json(run_dir / "results.json", computed)
    write_json(run_dir / "timing.json", timing)


def environment_info(run_root: Path | None = None) -> dict[str, Any]:
    """Versions, devices, git state and host; never environment variables or credentials."""
    import monai
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    info: dict[str, Any] = {
        "medctl": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else ("mps" if mps else "cpu"),
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **git_state(),
    }
    if run_root is not None:
        probe = run_root if run_root.exists() else Path.cwd()
        info["free_disk_gb"] = round(shutil.disk_usage(probe).free / 1e9, 1)
    return info


@dataclass(frozen=True)
class Dependency:
    name: str
    installed: str | None  # None: not installed
    bound: str  # the lower bound pyproject.toml declares, e.g. ">=3.0"

    @property
    def ok(self) -> bool:
        return self.installed is not None and _release(self.installed) >= _release(self.bound.removeprefix(">="))


def dependency_versions() -> list[Dependency]:
    """Every dependency medctl declares, with the installed version and the declared lower bound."""
    found = []
    for requirement in importlib.metadata.requires("medctl") or []:
        if ";" in requirement and "extra ==" in requirement:
            continue
        match = re.match(r"\s*([A-Za-z0-9_.-]+)[^;]*?(>=\s*[0-9][0-9.]*)?\s*(;.*)?$", requirement)
        if match is None or (match[3] and "python_version <" in match[3]):
            continue
        try:
            installed: str | None = importlib.metadata.version(match[1])
        except importlib.metadata.PackageNotFoundError:
            installed = None
        found.append(Dependency(match[1], installed, (match[2] or ">=0").replace(" ", "")))
    return found


def _release(version: str) -> tuple[int, ...]:
    """(3, 0, 2) from "3.0.2", "3.0.2rc1" or "2.15.0+cu132": enough to compare with a lower bound."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain") if sha else None
    return {"git_sha": sha, "git_dirty": bool(dirty) if dirty is not None else None}


def redact(command: str) -> str:
    """Hide values of key=value words whose key looks secret (a password passed as an override)."""
    words = []
    for word in command.split():
        key, sep, _ = word.partition("=")
        words.append(f"{key}=***" if sep and SECRET_PATTERN.search(key) else word)
    return redact_url_credentials(" ".join(words))


