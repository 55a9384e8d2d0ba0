"""Self-supervised pretraining: one module per method (byol, mim_contrastive, jepa) plus the views
(:mod:`~medctl.pretrain.views`) and masks (:mod:`~medctl.pretrain.masks`) they learn from.

:data:`METHODS` maps ``pretrain.method`` to the method's :class:`~medctl.pretrain.spec.MethodSpec`: its
typed table ``[pretrain.<name>]`` (every setting and default of the method, in its own module), its
minimum batch and its ``nn.Module``. Adding a method is one module and one line here. The tables are
checked with the rest of the config (:func:`method_table_problems`, run by every command that loads one)
and each method is built from its own (:func:`method_settings`, :func:`build_method`). Every method
offers the same small surface to the stage (:mod:`~medctl.pretrain.run`):

- ``Module(encoder, settings)``: built from the encoder and its typed table, passed whole;
- ``forward(x) -> {"loss": scalar with a graph, <other scalars logged as train_<name>>}``;
- ``update_target(momentum)``: move the EMA target network(s) after an optimizer step (no-op without);
- ``embed(x) -> (B, D)``: the online encoder's pooled embedding, for monitoring;
- ``reconstruct(x) -> {"original", "mask", "reconstruction"} | None``: for reconstruction panels;
- ``.encoder``: the online encoder, exported as ``checkpoints/encoder.ckpt``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from torch import nn

from medctl.config import PretrainConfig, Section, describe_validation_errors, unknown_key_problems
from medctl.errors import ConfigError
from medctl.pretrain import byol, jepa, mim_contrastive
from medctl.pretrain.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "byol": byol.SPEC,  # any encoder, 2D or 3D; mt3 for volumes
    "mim_contrastive": mim_contrastive.SPEC,  # unet2d on 2D slices
    "jepa": jepa.SPEC,  # vit3d_* on volumes
}


def method_table_problems(pretrain: Any) -> list[str]:
    """``pretrain.method`` against :data:`METHODS` and every ``[pretrain.<name>]`` table (the raw tree's
    ``pretrain``, or a validated PretrainConfig) against its method's section, each problem naming its key."""
    problems = []
    if isinstance(pretrain, PretrainConfig):  # built in code: load_config names a loose key with a suggestion
        loose = [k for k, v in (pretrain.model_extra or {}).items() if not isinstance(v, Mapping)]
        problems += [f"`pretrain.{k}` is not a [pretrain] key; a method's settings go in [pretrain.<method>]" for k in loose]
        pretrain = pretrain.model_dump()
    if not isinstance(pretrain, Mapping):
        return []
    method = pretrain.get("method", PretrainConfig.model_fields["method"].default)
    if isinstance(method, str) and method not in METHODS:
        problems.append(f"`pretrain.method` = {method!r} is not a pretraining method; {_known(method)}")
    for name, table in pretrain.items():
        if name in PretrainConfig.model_fields or not isinstance(table, Mapping):
            continue  # the shared keys are config/models.py's
        if name not in METHODS:
            problems.append(f"`[pretrain.{name}]` is not a pretraining method's table; {_known(name, 'pretrain.')}")
            continue
        problems += _table_problems(name, table)
    return problems


def method_settings(pretrain: PretrainConfig, method: str = "") -> Section:
    """The typed table of ``method`` (default: ``pretrain.method``), its defaults filled in."""
    name = method or pretrain.method
    if name not in METHODS:
        raise ConfigError([f"`pretrain.method` = {name!r} is not a pretraining method; {_known(name)}"], "pretrain")
    table = (pretrain.model_extra or {}).get(name, {})
    problems = _table_problems(name, table)
    if problems:
        raise ConfigError(problems, "pretrain")
    return METHODS[name].settings.model_validate(table)


def resolved_pretrain(pretrain: PretrainConfig) -> PretrainConfig:
    """``pretrain`` checked (:func:`method_table_problems`) with its method's table complete, so the run's
    config.toml and checkpoints hold every setting the method ran with."""
    problems = method_table_problems(pretrain)
    if problems:
        raise ConfigError(problems, "pretrain")
    table = method_settings(pretrain).model_dump(mode="json")
    return PretrainConfig.model_validate(pretrain.model_dump(mode="json") | {pretrain.method: table})


def build_method(method: str, encoder: nn.Module, settings: Section) -> nn.Module:
    """The method's module around ``encoder``, from its typed table (:func:`method_settings`)."""
    return METHODS[method].build(encoder, settings)


def min_batch_problem(method: str, batch_size: int) -> str:
    """The line that says ``batch_size`` is below what ``method`` needs, or ""."""
    spec = METHODS[method]
    if batch_size >= spec.min_batch:
        return ""
    why = f" ({spec.min_batch_reason})" if spec.min_batch_reason else ""
    return f"`data.batch_size` = {batch_size}: {method} needs at least {spec.min_batch} samples per batch{why}"


def _table_problems(name: str, table: Mapping[str, Any]) -> list[str]:
    prefix = f"pretrain.{name}."
    problems = unknown_key_problems(table, METHODS[name].settings, prefix)
    try:
        METHODS[name].settings.model_validate(table)
    except ValidationError as exc:
        problems += describe_validation_errors(exc, prefix)
    return problems


def _known(name: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
    hint = f"did you mean `{prefix}{close[0]}`? " if close else ""
    return f"{hint}known: {', '.join(METHODS)} (`medctl list methods`)"


__all__ = ["METHODS", "MethodSpec", "build_method", "method_settings", "method_table_problems", "min_batch_problem"]
