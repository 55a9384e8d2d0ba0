"""A resolved config checked against the registries and the models and data it will build, before any work.

:func:`medctl.config.load_config` checks each key on its own (types, ranges, unknown keys). This module
checks what needs the model code: every registry name (``model.encoder``, ``saliency.methods``,
``pretrain.method`` and each method's table ``[pretrain.<method>]``, and the ``Literal`` names config.py
already checks: ``train.loss``, ``model.head.kind``),
then builds the stage's modules on PyTorch's ``meta`` device (no memory, no initialisation) from the
settings, so what a long run would reject after preprocessing is rejected at once: encoder args the
encoder does not take, an input size it cannot read, a BYOL rotation on a non-square plane, a JEPA
predictor whose width the heads do not divide, a head the encoder cannot feed, a monitor the run will
not produce. Every problem is collected into one :class:`~medctl.errors.ConfigError`.

Which stages a config is checked for: a command names its own (``medctl pretrain`` -> ``pretrain``);
``medctl check config`` checks the stages whose sections the config sets (:func:`stages_of`).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from medctl.config import Config
from medctl.errors import ConfigError

STAGES = ("preprocess", "pretrain", "finetune", "sweep", "evaluate", "saliency")
AUTO_ENCODER = "auto"  # model.encoder = "auto": the architecture is read from model.checkpoint


def stages_of(config: Config) -> set[str]:
    """The stages a config sets up, from the sections it sets: [pretrain] -> pretrain; [model] or [train]
    -> finetune; [sweep] -> sweep; [saliency] -> saliency."""
    sections = config.model_fields_set
    stages = {"preprocess"}
    if "pretrain" in sections:
        stages.add("pretrain")
    if sections & {"model", "train"}:
        stages.add("finetune")
    if "sweep" in sections:
        stages.add("sweep")
    if "saliency" in sections:
        stages.add("saliency")
    return stages


def validate_config(config: Config, stages: Iterable[str], source: str = "config") -> Config:
    """``config`` when every check of ``stages`` passes; else one ConfigError listing every problem."""
    problems = config_problems(config, set(stages))
    if problems:
        raise ConfigError(problems, source)
    return config


def config_problems(config: Config, stages: Collection[str]) -> list[str]:
    problems = registry_problems(config.model_dump())
    if problems or not set(stages) & {"pretrain", "finetune", "sweep"}:
        return problems
    encoder = None  # "auto": the architecture comes from the checkpoint and is checked when it loads
    if config.model.encoder != AUTO_ENCODER:
        encoder, problems = _meta_encoder(config)
        if encoder is None:
            return problems
    if "pretrain" in stages:
        problems += pretrain_problems(config, encoder)
    if set(stages) & {"finetune", "sweep"}:
        problems += finetune_problems(config, encoder)
    return problems


# -------------------------------------------------------------------------------------- registries
def registry_problems(tree: Mapping[str, Any]) -> list[str]:
    """``model.encoder``, ``saliency.methods`` and ``pretrain.method`` of a layered config tree against their
    registries, with the closest name, and every ``[pretrain.<method>]`` table against its method's section
    (``load_config(name_checks=registry_problems)`` reports them with every other problem)."""
    from medctl.models.registry import ENCODERS
    from medctl.pretrain import method_table_problems
    from medctl.saliency.attribution import METHOD_ALIASES, METHODS

    model = tree.get("model") if isinstance(tree.get("model"), Mapping) else {}
    saliency = tree.get("saliency") if isinstance(tree.get("saliency"), Mapping) else {}
    problems = []
    encoder = model.get("encoder")
    if isinstance(encoder, str) and encoder not in ENCODERS and encoder != AUTO_ENCODER:
        problems.append(
            f"`model.encoder` = {encoder!r} is not a registered encoder; "
            f"{_did_you_mean(encoder, list(ENCODERS))}see `medctl list models` (or \"auto\": "
            "read it from model.checkpoint)"
        )
    methods = saliency.get("methods")
    for name in methods if isinstance(methods, list) else []:
        if isinstance(name, str) and name not in METHODS and name not in METHOD_ALIASES:
            problems.append(
                f"`saliency.methods` has unknown method {name!r}; {_did_you_mean(name, [*METHODS, *METHOD_ALIASES])}"
                "see `medctl list attributions`"
            )
    if methods == []:
        problems.append("`saliency.methods` is empty; e.g. [\"integrated_gradients\", \"gradcam\"]")
    return problems + method_table_problems(tree.get("pretrain"))


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f"did you mean `{close[0]}`? " if close else ""


# ------------------------------------------------------------------------------------------ model
def input_size_of(config: Config, spatial_dims: int, default: tuple[int, ...]) -> tuple[int, ...] | None:
    """The size the encoder will see: data.preprocess.spatial_size, or the encoder's default when it is [];
    for EEG the spectrogram's (H, W), None when only the recordings can tell it."""
    if config.data.modality == "eeg":
        from medctl.data.spectrogram import expected_image_size

        return expected_image_size(config.data.eeg)
    size = tuple(config.data.preprocess.spatial_size)
    return size if size else default[-spatial_dims:]


def _meta_encoder(config: Config):
    """The configured encoder built on the meta device, or None and the problems that stopped it."""
    import torch

    from medctl.models.registry import build_encoder, get_spec

    model = config.model
    spec = get_spec(model.encoder)
    size = input_size_of(config, spec.spatial_dims, spec.default_input_size)
    if size is None:
        return None, []  # EEG whose spectrogram size the recordings decide: checked when the cache is built
    if len(size) != spec.spatial_dims:
        kind = "2D images (H, W)" if spec.spatial_dims == 2 else "3D volumes (D, H, W)"
        return None, [
            f"`model.encoder` = {model.encoder!r} reads {kind} but data.preprocess.spatial_size = {list(size)} "
            f"has {len(size)} axes; pick a {len(size)}D encoder (`medctl list models`) or change the size"
        ]
    unknown = _unknown_encoder_args(model.encoder, spec.builder, model.encoder_args)
    if unknown:
        return None, unknown
    try:
        with torch.device("meta"):
            encoder = build_encoder(model.encoder, in_channels=model.in_channels, input_size=size, **model.encoder_args)
    except ConfigError as exc:
        return None, _keyed(exc)
    except (TypeError, ValueError) as exc:
        return None, [f"`model.encoder_args` = {model.encoder_args}: {model.encoder} cannot be built ({exc})"]
    return encoder, []


def _unknown_encoder_args(name: str, builder, args: dict) -> list[str]:
    """Encoder args the builder (or the class it forwards ``**kwargs`` to) does not take."""
    parameters = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        target = typing.get_type_hints(builder).get("return")
        parameters = inspect.signature(target.__init__).parameters if target is not None else {}
        if not parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return []  # takes anything; the build below is the check
    known = [p for p in parameters if p not in ("self", "in_channels", "input_size")]
    return [
        f"`model.encoder_args` has `{arg}`, which {name} does not take; {_did_you_mean(arg, known)}"
        f"it takes: {', '.join(known)}"
        for arg in args
        if arg not in known
    ]


def _keyed(exc: ConfigError) -> list[str]:
    """A ConfigError's problems, each naming its key when the error names one."""
    if exc.source in ("config", ""):
        return list(exc.problems)
    return [p if p.startswith("`") else f"`{exc.source}`: {p}" for p in exc.problems]


# --------------------------------------------------------------------------------------- pretrain
def pretrain_problems(config: Config, encoder) -> list[str]:
    """The method built on the meta device from its table [pretrain.<method>] and the encoder; the batch it needs."""
    import torch

    from medctl.pretrain import METHODS, build_method, method_settings, min_batch_problem

    method = config.pretrain.method
    if method not in METHODS:  # reported by registry_problems
        return []
    problems = [p for p in [min_batch_problem(method, config.data.batch_size)] if p]
    if encoder is None:  # None under "auto": built when the checkpoint loads
        return problems
    try:
        with torch.device("meta"):
            build_method(method, encoder, method_settings(config.pretrain))
    except ConfigError as exc:
        problems += _keyed(exc)
    return problems


# --------------------------------------------------------------------------------------- finetune
def _data_dims(config: Config) -> int | None:
    """2 or 3 as the data says (EEG spectrograms are images); None when only the encoder can say."""
    if config.data.modality == "eeg":
        return 2
    return len(config.data.preprocess.spatial_size) or None


def finetune_problems(config: Config, encoder) -> list[str]:
    """Heads, losses, monitor, the unfreeze schedule and augmentations against the encoder and targets
    (``encoder`` None under "auto": the checks that need it wait for the checkpoint)."""
    import numpy as np
    import torch

    from medctl.data.tables import TargetSpec
    from medctl.finetune.augment import check_augment
    from medctl.finetune.checks import check_monitor, encoder_trainable_from
    from medctl.models.classifier import build_classifier
    from medctl.models.heads import num_outputs
    from medctl.training.losses import LossSettings, build_target_loss, label_counts

    problems = []
    train, head = config.train, config.model.head
    loss = LossSettings.of(train)
    specs = [
        TargetSpec(t.name, t.kind, list(t.classes or t.columns))
        for t in config.data.targets
        if t.classes or t.columns  # classes read from the table are checked when the table is read
    ]
    checks = [lambda: encoder_trainable_from(config.model, train.epochs)]
    spatial_dims = encoder.spatial_dims if encoder is not None else _data_dims(config)
    if train.augment.enabled and spatial_dims:  # disabled augmentations are never built
        checks.append(lambda: check_augment(train.augment, spatial_dims))
    if config.data.targets:
        named = [TargetSpec(t.name, t.kind, list(t.classes or t.columns or ["?"])) for t in config.data.targets]
        checks.append(lambda: check_monitor(train.monitor, named))
    if specs and encoder is not None:

        def build_heads() -> None:
            with torch.device("meta"):
                build_classifier(encoder, specs, kind=head.kind, hidden=head.hidden, dropout=head.dropout)

        checks.append(build_heads)
    for spec in specs:
        outputs = num_outputs(spec.kind, spec.classes)
        # one sample of every class (every label on and off): counts in the layout the loss builders take
        rows = np.eye(outputs, dtype=int).tolist() + [[0] * outputs] if spec.kind == "multilabel" else range(len(spec.classes))
        counts = label_counts(np.asarray(list(rows)), spec.kind, outputs)
        checks.append(lambda spec=spec, counts=counts: build_target_loss(spec.kind, loss, counts, target=spec.name))
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems += _keyed(exc)
    return problems
