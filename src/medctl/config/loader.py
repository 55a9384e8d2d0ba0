"""The one loader: defaults < file chain (``extends``, ``replace``) < ``MEDCTL_*`` < ``key=value``, every problem
at once; :func:`apply_overrides` layers ``key=value`` items on a resolved config the same way."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from medctl.config.models import MOVED_KEYS, Config, PretrainConfig
from medctl.config.toml import deep_merge, drop_dotted, parse_value, set_dotted
from medctl.errors import CheckpointError, ConfigError, redact_url_credentials

ENV_PREFIX = "MEDCTL_"


# -------------------------------------------------------------------------------------------- layers
def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    source: str = "",
    name_checks: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> Config:
    """Resolve defaults < ``base`` < file chain < env < ``key=value`` overrides into one validated Config.

    The one loader of every command. ``base`` is a config tree that sits under the file: the resolved
    config a checkpoint holds, for ``evaluate`` and ``saliency``. ``source`` names it in errors.
    """
    env = os.environ if env is None else env
    saved = upgrade_saved_tree(base or {})  # a checkpoint's config from before [pretrain.<method>] tables
    layered: dict[str, Any] = deep_merge(saved, read_toml_chain(Path(path)) if path else {})
    source = str(path) if path else (source or "config")
    return _validated(layered, overrides, env, source=source, name_checks=name_checks)


def apply_overrides(
    config: Config,
    overrides: Iterable[str] = (),
    *,
    values: Mapping[str, Any] | None = None,
    source: str = "config",
    name_checks: Callable[[Mapping[str, Any]], list[str]] | None = None,
) -> Config:
    """A copy of ``config`` with ``values`` (dotted key -> value, set by the program) and then the ``key=value``
    ``overrides`` applied, checked as :func:`load_config` checks a file: every problem in one ConfigError."""
    tree = config.model_dump(mode="json")
    for dotted, value in (values or {}).items():
        set_dotted(tree, dotted, value)
    return _validated(tree, overrides, {}, source=source, name_checks=name_checks)


def _validated(
    layered: dict[str, Any],
    overrides: Iterable[str],
    env: Mapping[str, str],
    *,
    source: str,
    name_checks: Callable[[Mapping[str, Any]], list[str]] | None,
) -> Config:
    """``layered`` with the ``MEDCTL_*`` variables of ``env`` and the ``key=value`` items on top, validated;
    each problem about a key one of them set names that layer (:func:`blame_layers`)."""
    problems: list[str] = []
    layers: dict[str, str] = {}  # dotted key -> the layer that set it last, when not the file
    for dotted, value in env_overrides(env, problems):
        set_dotted(layered, dotted, value)
        layers[dotted] = f"environment {ENV_PREFIX}{dotted.upper().replace('.', '__')}"
    overrides = list(overrides)
    for (dotted, value), item in zip(parse_overrides(overrides, problems), _well_formed(overrides), strict=True):
        set_dotted(layered, dotted, value)
        layers[dotted] = f"override `{item}`"
    problems += unknown_key_problems(layered, Config)
    try:
        config = Config.model_validate(layered)
    except ValidationError as exc:
        problems += describe_validation_errors(exc)
    if name_checks is not None:
        problems += name_checks(layered)
    if problems:
        raise ConfigError(*blame_layers(problems, layers, source))
    return config


def _well_formed(overrides: list[str]) -> list[str]:
    """The ``key=value`` items :func:`parse_overrides` keeps, as typed."""
    return [item for item in overrides if item.partition("=")[1] and item.partition("=")[0].strip()]


def blame_layers(problems: list[str], layers: Mapping[str, str], source: str) -> tuple[list[str], str]:
    """(problems, source) with each problem about a key an override or ``MEDCTL_*`` variable set naming that
    layer: as the source when every problem comes from one, else after the problem (the file is blameless)."""
    ordered = sorted(layers, key=len, reverse=True)  # data.eeg.channels before data.eeg

    def same_branch(key: str, named: str) -> bool:  # one is the other, or a table holding it
        return named == key or named.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{named}.")

    def layer_of(problem: str) -> str:
        if problem.startswith(("override `", ENV_PREFIX)):  # about the layer itself (not key=value, ...)
            return "command line" if problem.startswith("override") else "environment"
        named = re.findall(r"`([^`]+)`", problem.split("; did you mean")[0])  # not the key it suggests
        return next((layers[key] for key in ordered if any(same_branch(key, n) for n in named)), "")

    found = [layer_of(p) for p in problems]
    if found and all(found) and len(set(found)) == 1:
        return problems, found[0]
    return [f"{p} (set by {layer})" if layer else p for p, layer in zip(problems, found, strict=True)], source


def checkpoint_config(
    meta: Mapping[str, Any],
    checkpoint: str | Path,
    config_overrides: Config | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """The training config a checkpoint holds (``meta["config"]``), with the given Config's data/run, the file,
    ``MEDCTL_*`` variables and overrides layered on top (:func:`load_config`); what evaluate and saliency run with."""
    text = meta.get("config") or ""
    try:
        layered: dict[str, Any] = tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError as exc:
        raise CheckpointError(
            f"{checkpoint}: its config text is not valid TOML ({exc}); pass the data settings with -c"
        ) from None
    if not text and config_file is None and config_overrides is None:
        raise CheckpointError(f"{checkpoint}: holds no config; pass the data settings with -c CONFIG.toml")
    if config_overrides is not None:
        dumped = config_overrides.model_dump(mode="json")
        layered |= {"data": dumped["data"], "run": dumped["run"]}
    return load_config(config_file, overrides, base=layered, source=str(checkpoint))


def read_toml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and every file it ``extends``, the child's values winning."""
    path = path.expanduser().resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise ConfigError([f"`extends` makes a cycle: {chain}; remove one of the links"], str(path))
    if not path.is_file():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ConfigError([f"config file not found{where}; check the path"], str(path))
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    parent = data.pop("extends", None)
    replaced = data.pop("replace", [])
    if parent is None:
        if replaced:
            raise ConfigError(["`replace` only applies to a file that `extends` another; remove it"], str(path))
        return data
    if not isinstance(parent, str):
        raise ConfigError(["`extends` must be a path string relative to this file"], str(path))
    problems = replace_problems(replaced)
    if problems:
        raise ConfigError(problems, str(path))
    base = read_toml_chain(path.parent / parent, (*seen, path))
    for dotted in replaced:
        drop_dotted(base, dotted)
    return deep_merge(base, data)


# Keys added after runs were already written, with the value that reproduces how those runs behaved: a probe
# read raw embeddings before model.head.standardize, and BYOL's pretext views kept their intensity trend
# before pretrain.byol.pretext_reorient, its views had no bias field before pretrain.byol.view_bias_field, its
# predictor learned at pretrain.lr before pretrain.byol.predictor_lr_scale, and its loss had no decorrelation
# term before pretrain.byol.decorrelation_weight.
# --resume then names the one setting that continues such a run.
ADDED_KEYS: dict[str, Any] = {
    "model.head.standardize": False,
    "pretrain.byol.pretext_reorient": 0.0,
    "pretrain.byol.view_bias_field": 0.0,
    "pretrain.byol.predictor_lr_scale": 1.0,
    "pretrain.byol.decorrelation_weight": 0.0,
}


def upgrade_saved_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A config tree this program wrote (a run's config.toml, a checkpoint's config) with the flat
    ``[pretrain]`` keys of older versions moved into the table of its method (:data:`MOVED_KEYS`; the other
    methods' keys did nothing and are dropped); a user's file gets the one-line "moved to" error instead.
    A ``[model.head]`` from before ``standardize`` existed says ``standardize = false``: that run's probe read
    raw embeddings, so ``--resume`` names the setting that continues it as it started."""
    upgraded = dict(tree)
    pretrain = tree.get("pretrain")
    if isinstance(pretrain, Mapping):
        upgraded["pretrain"] = dict(pretrain)
        table = f"pretrain.{pretrain.get('method', PretrainConfig.model_fields['method'].default)}."
        for dotted, targets in MOVED_KEYS.items():
            key = dotted.split(".", 1)[1]
            if key in pretrain:
                value = upgraded["pretrain"].pop(key)
                for target in (t for t in targets if t.startswith(table)):
                    set_dotted(upgraded, target, value, keep=True)
    for dotted, old_behaviour in ADDED_KEYS.items():  # a table written before the key existed behaved the old way
        *parents, key = dotted.split(".")
        table = upgraded
        for name in parents:
            table = table.get(name) if isinstance(table, Mapping) else None
        if isinstance(table, Mapping) and key not in table:
            set_dotted(upgraded, dotted, old_behaviour, keep=True)
    return upgraded


def replace_problems(replaced: Any) -> list[str]:
    """``replace`` lists dotted keys of the config (e.g. "model.encoder_args"); anything else is named."""
    if not isinstance(replaced, list) or not all(isinstance(k, str) for k in replaced):
        return ['`replace` must be a list of dotted keys, e.g. replace = ["model.encoder_args"]']
    problems = []
    for dotted in replaced:
        model: type[BaseModel] | None = Config
        prefix = ""
        for part in dotted.split("."):
            fields = model.model_fields if model is not None else {}
            if part not in fields and model is not None and takes_tables(model):
                break  # a method table ([pretrain.byol]): the pretrain layer knows its keys
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.5)
                hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
                problems.append(f"`replace` names `{dotted}`, which is not a config key{hint}")
                break
            model = _section_model(fields[part].annotation)
            prefix += f"{part}."
    return problems


def parse_overrides(items: Iterable[str], problems: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override `{item}` is not key=value (e.g. train.lr_head=1e-4)")
            continue
        parsed.append((key.strip(), parse_value(value.strip())))
    return parsed


def env_overrides(env: Mapping[str, str], problems: list[str]) -> list[tuple[str, Any]]:
    """``MEDCTL_TRAIN__LR_HEAD=1e-4`` -> ``("train.lr_head", 1e-4)``; MEDCTL_DEBUG is not config."""
    sections = set(Config.model_fields)
    parsed = []
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if dotted.split(".")[0] not in sections:
            problems.append(f"{name}: unknown section; use MEDCTL_<SECTION>__<KEY>")
            continue
        parsed.append((dotted, parse_value(value)))
    return parsed


def unknown_key_problems(tree: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """Name every unknown key with the closest known one; recurse into sections and tables."""
    problems = []
    fields = model.model_fields
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in MOVED_KEYS:
            problems.append(f"`{dotted}` moved to {' or '.join(f'`{k}`' for k in MOVED_KEYS[dotted])}")
            continue
        if key not in fields and takes_tables(model) and isinstance(value, Mapping):
            continue  # a method table ([pretrain.byol]): the pretrain layer checks it
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known: {', '.join(fields)}"
            problems.append(f"unknown key `{dotted}`{hint}")
            continue
        sub = _section_model(fields[key].annotation)
        if sub is None:
            continue
        if isinstance(value, Mapping):
            problems += unknown_key_problems(value, sub, f"{dotted}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    problems += unknown_key_problems(item, sub, f"{dotted}[{i}].")
    return problems


def takes_tables(model: type[BaseModel]) -> bool:
    """A section that holds tables its own fields do not name (``[pretrain]``: one table per method)."""
    return model.model_config.get("extra") == "allow"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe_validation_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem naming its dotted key (under ``prefix``, e.g. "pretrain.byol.")."""
    problems = []
    for err in exc.errors():
        if err["type"] == "extra_forbidden":  # reported with a suggestion by unknown_key_problems
            continue
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        key = prefix + key.replace(".[", "[")
        value = err.get("input")
        shown = redact_url_credentials(repr(value)) if not isinstance(value, dict) else "a table"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error" and isinstance(value, str):
            known = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
            close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
            message += f"; did you mean `{close[0]}`?" if close else ""
        problems.append(f"`{key}` = {shown}: {message}")
    return _unique(problems)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
