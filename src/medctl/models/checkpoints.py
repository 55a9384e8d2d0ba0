"""Checkpoints: medctl's own format, atomic writes, and one loader for foreign encoder weights.

medctl format (tensors and plain values only, so ``torch.load(weights_only=True)`` reads it)::

    {"medctl": {"format": 1, "kind": "encoder" | "classifier" | "train_state", "version": str},
     "model": {"name": str, "args": {"in_channels", "input_size", **encoder_args}, "head": {...}},
     "state_dict": {...}, "targets": [...], "preprocessing": {...}, "config": str, "metrics": {...}}

Encoder checkpoints hold the bare encoder state dict; classifier checkpoints the classifier's
(``encoder.*`` and ``heads.<target>.*``) plus everything ``evaluate`` and ``saliency`` need.

Foreign files go through :func:`load_encoder_weights`: V-JEPA 2 / V-JEPA / I-JEPA training checkpoints
(``encoder``, ``target_encoder``, ``predictor``, ``opt``, ``epoch``; keys under ``module.backbone.``;
``context_encoder`` where a lab renamed the online encoder),
bare state dicts, Lightning (``state_dict`` with ``model.`` / ``model.encoder.`` keys), DDP
(``module.``) and medctl encoder/classifier checkpoints. The wrapper prefix is found by matching keys
against the encoder's; a multi-channel stem is summed to one channel; a sincos ``pos_embed`` is read
for the grid it was made for and resized to the encoder's (by grid, never by count); loaded, missing,
unexpected and mis-shaped keys are reported, and a partial load or a contradicted setting (a position
scheme the checkpoint was not trained with) is refused unless allowed. Which encoder a file needs is
read by :mod:`medctl.models.architecture`. Nothing is ever unpickled with ``weights_only=False``.
"""

from __future__ import annotations

import math
import pickle
import pickletools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medctl import __version__
from medctl.errors import CheckpointError
from medctl.io import atomic_write
from medctl.models.classifier import Classifier, build_classifier
from medctl.models.encoders.base import Encoder
from medctl.models.registry import build_encoder

FORMAT_VERSION = 1
KINDS = ("encoder", "classifier", "train_state")
# model.checkpoint_key = "" picks the first present: the EMA target of a JEPA file (what V-JEPA evaluates and
# medctl's jepa exports as encoder.ckpt; V-JEPA 2.1's distilled releases call it ema_encoder), its online
# encoder, the OCT plan's name for it, then Lightning/bare
AUTO_KEYS = ("target_encoder", "ema_encoder", "encoder", "context_encoder", "state_dict", "model")
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")


# ------------------------------------------------------------------------------------ read / write
def _numpy_scalar_globals() -> list[Any]:
    """Numpy scalars and numeric dtypes (a loss saved as np.float64): data, not code."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    numeric = [d for d in dtypes if getattr(d, "type", None) is not None and np.dtype(d.type).kind in "biufc"]
    return [core.multiarray.scalar, np.dtype, *numeric]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear CheckpointError per failure."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; point model.checkpoint / --ckpt at a checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check model.checkpoint / --ckpt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), e.g. a copy or download that failed; copy it again")
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"  # torch's zip format: memory-map, so optimizer state never loads
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"{path}: corrupt or incomplete checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "copy or download it again"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a dict of tensors; save a state_dict()")
    return ckpt


def _unpickling_error(path: Path, exc: pickle.UnpicklingError) -> CheckpointError:
    text = str(exc)
    if "truncated" in text or "invalid load key" in text or "Weights only load failed" not in text:
        return CheckpointError(f"{path}: corrupt or incomplete checkpoint ({_first_line(exc)}); copy or download it again")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):  # not torch's zip format
        unsafe = pickle_globals(path)
    named = f" ({', '.join(unsafe[:5])})" if unsafe else ""
    return CheckpointError(
        f"{path}: refused: the file holds pickled Python objects{named} that could run code when loaded; "
        "medctl only loads tensors and plain values (weights_only=True). If you trust the file, re-save its "
        "weights with torch.save(model.state_dict(), 'weights.pt') and load that"
    )


def pickle_globals(path: Path) -> list[str]:
    """The callables a plain pickle file names, read with pickletools (nothing is executed)."""
    found, strings = [], []
    try:
        with open(path, "rb") as fh:
            for opcode, arg, _ in pickletools.genops(fh):
                if opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except (ValueError, EOFError, OSError, pickle.UnpicklingError):
        pass  # a partial list is still worth showing
    return [name for name in dict.fromkeys(found) if not name.startswith(("torch.", "collections.OrderedDict"))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write through :func:`medctl.io.atomic_write`: never a half-written checkpoint."""
    path = Path(path)
    check_plain(payload)
    with atomic_write(path, "wb") as fh:
        torch.save(dict(payload), fh)
    return path


PLAIN_TYPES = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.Size)


def check_plain(value: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first value that ``weights_only=True`` could not load back."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain values")


def plain(value: Any) -> Any:
    """Numpy scalars -> Python numbers, tuples -> lists, paths -> str, recursively."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _header(kind: str) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "kind": kind, "version": __version__}


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def encoder_payload(
    encoder: Encoder, *, name: str, args: Mapping[str, Any], config_text: str = "", metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A medctl encoder checkpoint: the bare encoder state dict plus how to rebuild it."""
    return {
        "medctl": _header("encoder"),
        "model": {"name": name, "args": plain(args)},
        "state_dict": _cpu_state(encoder),
        "config": config_text,
        "metrics": plain(metrics or {}),
    }


def classifier_payload(
    classifier: Classifier,
    *,
    model_info: Mapping[str, Any],
    targets: list[Mapping[str, Any]],
    preprocessing: Mapping[str, Any],
    config_text: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A self-contained classifier checkpoint; ``model_info`` is ``{"name", "args", "head"}``."""
    missing = {"name", "args", "head"} - set(model_info)
    if missing:
        raise ValueError(f"model_info lacks {sorted(missing)}; it needs name, args and head")
    return {
        "medctl": _header("classifier"),
        "model": plain(model_info),
        "state_dict": _cpu_state(classifier),
        "targets": plain(list(targets)),
        "preprocessing": plain(preprocessing),
        "config": config_text,
        "metrics": plain(metrics or {}),
    }


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a classifier from its medctl checkpoint alone; returns it (eval mode) and the metadata."""
    ckpt = read_checkpoint(path)
    kind = ckpt.get("medctl", {}).get("kind") if isinstance(ckpt.get("medctl"), dict) else None
    if kind != "classifier":
        found = f"a medctl {kind} checkpoint" if kind else "not a medctl checkpoint"
        raise CheckpointError(f"{path}: {found}; pass a classifier from `medctl finetune` (runs/<name>/checkpoints/best.ckpt)")
    model = ckpt["model"]
    args = dict(model["args"])
    encoder = build_encoder(
        model["name"], in_channels=args.pop("in_channels", 1), input_size=args.pop("input_size"), **args
    )
    head = model["head"]
    classifier = build_classifier(
        encoder,
        ckpt["targets"],
        kind=head["kind"],
        hidden=head.get("hidden", 0),
        dropout=head.get("dropout", 0.0),
        num_heads=head.get("num_heads", 0),
    )
    try:
        classifier.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model it describes ({_first_line(exc)})") from None
    meta = {k: ckpt.get(k) for k in ("medctl", "model", "targets", "preprocessing", "config", "metrics")}
    return classifier.to(device).eval(), meta


# --------------------------------------------------------------------------------- foreign weights
@dataclass
class LoadReport:
    """What loading a checkpoint into an encoder did, key by key."""

    path: str
    format: str  # what the file is, e.g. "V-JEPA/I-JEPA training checkpoint"
    source_key: str = ""  # the top-level entry the weights came from ("" for a bare state dict)
    prefix: str = ""  # the wrapper prefix stripped from the keys, e.g. "module.backbone."
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the encoder, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint section, not in the encoder
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    ignored: list[str] = field(default_factory=list)  # keys outside the prefix (heads, predictor parts)
    notes: list[str] = field(default_factory=list)  # adaptations made and warnings
    conflicts: list[str] = field(default_factory=list)  # settings the checkpoint contradicts (position scheme)
    loaded_share: float = 0.0  # share of the encoder's state elements loaded

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched and not self.conflicts

    def share(self) -> str:
        """``28 of 28 keys (100% of the encoder)``; with any key missing, mis-shaped or unexpected the counts
        are named and the share is rounded down or left out, so it never reads 100% (99.99% is 99.9%)."""
        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        if self.complete and not self.unexpected:
            percent = " (100% of the encoder)"
        elif self.loaded_share < 1:
            percent = f" ({math.floor(self.loaded_share * 1000) / 10:.1f}% of the encoder)"
        else:  # every value of the encoder loaded, but the file had more: the counts say so, not "100%"
            percent = ""
        text = f"{len(self.loaded)} of {total} keys{percent}"
        counts = [(len(self.missing), "missing"), (len(self.mismatched), "mis-shaped"), (len(self.unexpected), "unexpected")]
        return text + "".join(f", {n} {what}" for n, what in counts if n)

    def lines(self, limit: int = 5) -> list[str]:
        """A human summary, a few example keys per group."""

        def some(keys: list[str]) -> str:
            more = f", ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        source = f", entry `{self.source_key}`" if self.source_key else ""
        prefix = f", prefix `{self.prefix}` stripped" if self.prefix else ""
        out = [f"format: {self.format}{source}{prefix}", f"loaded: {self.share()}"]
        out += [f"note: {note}" for note in self.notes]
        out += [f"conflict: {conflict}" for conflict in self.conflicts]
        if self.missing:
            out.append(f"missing: {len(self.missing)} ({some(self.missing)})")
        if self.mismatched:
            shown = [f"{k} {list(c)} vs {list(m)}" for k, c, m in self.mismatched]
            out.append(f"mis-shaped (checkpoint vs encoder): {len(self.mismatched)} ({some(shown)})")
        if self.unexpected:
            out.append(f"unexpected: {len(self.unexpected)} ({some(self.unexpected)})")
        if self.ignored:
            out.append(f"ignored outside `{self.prefix}`: {len(self.ignored)} ({some(self.ignored)})")
        return out


def describe_format(ckpt: Mapping[str, Any]) -> str:
    """What kind of file this is, from its top-level keys."""
    header = ckpt.get("medctl")
    if isinstance(header, dict):
        return f"medctl {header.get('kind', '?')} checkpoint (format {header.get('format', '?')})"
    if "predictor" in ckpt or "target_encoder" in ckpt or "ema_encoder" in ckpt:
        return "V-JEPA/I-JEPA training checkpoint"
    if "pytorch-lightning_version" in ckpt or ("state_dict" in ckpt and {"optimizer_states", "callbacks"} & set(ckpt)):
        return "Lightning checkpoint"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return "bare state dict"
    return "training checkpoint"


def select_state_dict(ckpt: Mapping[str, Any], path: str | Path, key: str = "") -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors to load, the format description and the entry they came from."""
    fmt = describe_format(ckpt)
    if fmt.startswith("medctl"):
        return _tensors(ckpt.get("state_dict"), path, "state_dict"), fmt, "state_dict"
    if key:
        if key not in ckpt:
            raise CheckpointError(
                f"{path}: no `{key}` entry (model.checkpoint_key); it has: {', '.join(map(str, list(ckpt)[:12]))}; "
                'set model.checkpoint_key to one of them, or to "" to pick automatically'
            )
        return _tensors(ckpt[key], path, key), fmt, key
    for candidate in AUTO_KEYS:
        if isinstance(ckpt.get(candidate), Mapping):
            return _tensors(ckpt[candidate], path, candidate), fmt, candidate
    if fmt == "bare state dict":
        return dict(ckpt), fmt, ""
    raise CheckpointError(
        f"{path}: no weights found: none of {', '.join(AUTO_KEYS)} is present and the file is not a bare state dict; "
        f"it has: {', '.join(map(str, list(ckpt)[:12]))}; name the entry with model.checkpoint_key"
    )


def entry_differences(ckpt: Mapping[str, Any], used: str) -> list[str]:
    """A note when a JEPA file's EMA target and online encoder differ, naming both and the one ``used``."""
    target = next((k for k in ("target_encoder", "ema_encoder") if isinstance(ckpt.get(k), Mapping)), "")
    if not target or not isinstance(ckpt.get("encoder"), Mapping) or used not in (target, "encoder"):
        return []
    a, b = ckpt[target], ckpt["encoder"]
    same = set(a) == set(b) and all(
        isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor) and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a
    )  # stops at the first difference
    if same:
        return []
    other = "encoder" if used == target else target
    why = "the EMA target V-JEPA's evaluations read" if used == target else "the online encoder V-JEPA 2's torch.hub loader reads"
    return [
        f"entries `{target}` and `encoder` hold different weights; `{used}` used ({why}): set "
        f'model.checkpoint_key = "{other}" for the other'
    ]


def _tensors(section: Any, path: str | Path, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(section, Mapping):
        raise CheckpointError(f"{path}: entry `{key}` is a {type(section).__name__}, not a state dict; check model.checkpoint_key")
    tensors = {str(k): v for k, v in section.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: entry `{key}` holds no tensors; check model.checkpoint_key")
    return tensors


def find_prefix(keys: list[str], model_keys: set[str]) -> str:
    """The wrapper prefix (``module.backbone.``, ``model.encoder.``, ...) that maps most keys onto the model's."""
    votes: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                votes[".".join(parts[:i]) + "." if i else ""] += 1
                break
    if votes:
        best = max(votes.values())
        return min((p for p, n in votes.items() if n == best), key=len)
    prefix = ""  # nothing matches: strip the usual wrappers so the report shows meaningful names
    while keys and all(k.startswith(prefix) for k in keys):
        nxt = next((w for w in WRAPPER_PREFIXES if all(k.startswith(prefix + w) for k in keys)), None)
        if nxt is None:
            break
        prefix += nxt
    return prefix


def adapt_input_channels(weight: torch.Tensor, target: torch.Size) -> torch.Tensor | None:
    """A conv weight for C_in input channels -> 1 channel by summing over them; None if not that case."""
    if weight.ndim < 3 or len(target) != weight.ndim or target[1] != 1 or weight.shape[1] <= 1:
        return None
    if weight.shape[0] != target[0] or weight.shape[2:] != target[2:]:
        return None
    return weight.sum(dim=1, keepdim=True)


def plan_encoder_load(
    encoder: Encoder, path: str | Path, *, key: str = "", ckpt: Mapping[str, Any] | None = None
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Read ``path`` (or take its already read ``ckpt``), map its keys onto ``encoder`` and adapt what can
    be adapted; loads nothing yet."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    tensors, fmt, source = select_state_dict(ckpt, path, key)
    model_state = encoder.state_dict()
    prefix = find_prefix(list(tensors), set(model_state))
    if prefix.startswith("module.") and "DDP" not in fmt:
        fmt += ", saved from DDP"
    section = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    report = LoadReport(str(path), fmt, source, prefix, ignored=sorted(k for k in tensors if not k.startswith(prefix)))
    report.notes += entry_differences(ckpt, source)
    trained_as = ckpt.get("model", {}).get("name") if isinstance(ckpt.get("medctl"), dict) else None
    if trained_as and trained_as != getattr(encoder, "name", trained_as):
        report.notes.append(f"the checkpoint was saved from `{trained_as}`, the encoder is `{encoder.name}`")
    if hasattr(encoder, "adapt_state_dict"):
        notes, conflicts = encoder.adapt_state_dict(section)
        report.notes += notes
        report.conflicts += conflicts

    to_load = {}
    for name, value in section.items():
        if name not in model_state:
            report.unexpected.append(name)
            continue
        target = model_state[name].shape
        if value.shape != target:
            adapted = adapt_input_channels(value, target)
            if adapted is None:
                report.mismatched.append((name, tuple(value.shape), tuple(target)))
                continue
            report.notes.append(f"{name}: {value.shape[1]} input channels summed into 1 (model.in_channels = 1)")
            value = adapted
        to_load[name] = value
        report.loaded.append(name)
    report.missing = [k for k in model_state if k not in section]
    total = sum(v.numel() for v in model_state.values())
    report.loaded_share = sum(model_state[k].numel() for k in to_load) / max(total, 1)
    return report, to_load


def refusal(report: LoadReport, allow_partial: bool) -> str:
    """Why this load must not go ahead ("" when it may)."""
    if not report.loaded and report.mismatched:
        key, ckpt_shape, model_shape = report.mismatched[0]
        return (
            f"{report.path}: no weights fit: all {len(report.mismatched)} shared keys are mis-shaped (e.g. {key} "
            f"{list(ckpt_shape)} in the file vs {list(model_shape)} in the encoder); the checkpoint is for another "
            "model: check model.encoder and model.encoder_args"
        )
    if not report.loaded:
        return (
            f"{report.path}: none of the encoder's weights are in this checkpoint ({report.format}); "
            "check model.encoder and model.checkpoint_key"
        )
    if report.complete or allow_partial:
        return ""
    if report.conflicts:
        return f"{report.path}: refused: {report.conflicts[0]}"
    return (
        f"{report.path}: refused a partial load: loaded {report.share()}; check model.encoder and "
        "model.encoder_args match the checkpoint, or set model.allow_partial_load = true"
    )


def load_encoder_weights(
    encoder: Encoder, path: str | Path, *, key: str = "", allow_partial: bool = False
) -> LoadReport:
    """Load a checkpoint of any supported layout into ``encoder``; refuse a partial load unless allowed."""
    report, to_load = plan_encoder_load(encoder, path, key=key)
    reason = refusal(report, allow_partial)
    if reason:
        raise CheckpointError(reason)
    encoder.load_state_dict(to_load, strict=False)
    return report


# ------------------------------------------------------------------------------------- provenance
def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The ``provenance`` block of a medctl checkpoint (its pretraining pool, :mod:`medctl.data.provenance`);
    None for a foreign file or a checkpoint saved without one."""
    ckpt = read_checkpoint(path)
    block = ckpt.get("provenance") if isinstance(ckpt.get("medctl"), dict) else None
    return block if isinstance(block, dict) else None
