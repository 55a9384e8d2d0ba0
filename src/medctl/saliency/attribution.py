"""Attribution maps through Captum: integrated gradients, gradients, guided backprop, Grad-CAM, HiResCAM, occlusion.

Every method in :data:`METHODS` has one signature, ``method(scores, x, target, settings)``: ``scores`` is a
:class:`ClassScores` (the classifier reduced to one target's per-class scores), ``x`` one input
``(1, C, *S)`` on the model's device, ``target`` a class index, ``settings`` the ``[saliency]`` section
(its ``gradcam_layer`` already resolved to the layer this method reads), and the result a float32 numpy map of
shape ``S`` (2D or 3D). Channels are summed (signed methods) or max-reduced (gradient magnitude).

- Integrated gradients (Sundararajan et al. 2017, Captum ``IntegratedGradients``): zero baseline,
  ``settings.ig_steps`` steps; ``internal_batch_size`` is chosen to fit memory (see
  :func:`auto_internal_batch_size`).
- Gradients (Simonyan et al. 2014, Captum ``Saliency``): ``|d score / d x|``, max over channels.
- Guided backprop (Springenberg et al. 2015, Captum ``GuidedBackprop``): it overrides the backward pass
  of ``nn.ReLU`` modules only; a model whose non-linearities are GELU (ViTs) or functional ``F.relu``
  gets plain gradients, and a line in the log says so.
- Grad-CAM (Selvaraju et al. 2017) on ``encoder.gradcam_layer``, read as ``encoder.gradcam_layout``
  (default ``feature_layout``), or on the encoder module named by ``settings.gradcam_layer`` (read as
  tokens when its output is ``(B, N, C)``, else as a map): Captum ``LayerGradCam`` for feature maps
  ``(B, C, *s)``, upsampled
  (bi/trilinear) to the input; for token layers the tokens ``(B, N, C)``
  are reshaped to ``(B, C, *encoder.token_grid(S))`` after dropping leading extra tokens (class or
  register tokens) and the gradient-times-activation CAM is computed here, since Captum's layer methods
  assume channels on dimension 1. Both are ReLU'd, as in the paper.
- HiResCAM (Draelos & Carin 2020) on Grad-CAM's layer: Captum ``LayerGradientXActivation`` summed over
  channels and ReLU'd, i.e. each position keeps its own gradient instead of Grad-CAM's spatial average.
  It equals Grad-CAM where the layer is average-pooled straight into a linear head, and stays faithful
  where it is not (MT3's max-projections, whose gradients sit on the argmax voxels only).
- Occlusion (Zeiler & Fergus 2014, Captum ``Occlusion``): zero patches of ``settings.occlusion_window``
  moved by ``settings.occlusion_stride`` (clamped to the input size), every channel at once.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from captum.attr import (
    GuidedBackprop,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    LayerGradientXActivation,
    Occlusion,
    Saliency,
)
from torch import nn

from medctl.config import SaliencyConfig
from medctl.errors import ConfigError, RunFailure, UserError
from medctl.progress import log

TargetKind = Literal["binary", "multiclass", "multilabel"]

# Memory an attribution batch may use when saliency.memory_budget_gb is 0 ("auto"): on CUDA this share
# of the free device memory, on CPU a fixed budget (CPU memory is shared with the data and the OS, and
# the process cannot tell how much of it is really free).
CUDA_FREE_SHARE = 0.8
CPU_BUDGET_BYTES = 2 * 1024**3
MAX_PERTURBATIONS_PER_EVAL = 64  # occlusion: forward passes batched together at most


# ------------------------------------------------------------------------------------ class scores
class ClassScores(nn.Module):
    """One target's per-class scores ``(B, K)`` from a medctl classifier returning ``{target: logits}``.

    Binary heads have one logit ``l``; the scores are ``[-l, l]`` so class 1 (positive) is explained by
    the logit and class 0 (negative) by its negation. Multiclass and multilabel heads keep their logits.
    """

    def __init__(self, classifier: nn.Module, target_name: str, kind: TargetKind):
        super().__init__()
        if kind not in ("binary", "multiclass", "multilabel"):
            raise UserError(f"target kind {kind!r} is not binary, multiclass or multilabel")
        self.classifier = classifier
        self.target_name = target_name
        self.kind = kind
        self.train(classifier.training)  # a wrapper, not a layer: keep the classifier's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.classifier(x)
        if self.target_name not in outputs:
            known = ", ".join(sorted(outputs))
            raise UserError(f"the classifier has no head `{self.target_name}`; its heads are: {known}")
        logits = outputs[self.target_name]  # (B, K)
        if self.kind == "binary":
            if logits.shape[-1] != 1:
                raise UserError(
                    f"target `{self.target_name}` is binary but its head gives {logits.shape[-1]} logits; "
                    "a binary head has one logit (or declare the target multiclass)"
                )
            return torch.cat([-logits, logits], dim=1)  # (B, 2)
        return logits

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` probabilities: sigmoid of the logit for binary (as [1-p, p]) and multilabel, else softmax."""
        if self.kind == "binary":
            positive = torch.sigmoid(scores[:, 1:])  # (B, 1)
            return torch.cat([1 - positive, positive], dim=1)
        if self.kind == "multilabel":
            return torch.sigmoid(scores)
        return torch.softmax(scores, dim=1)


def spatial_window(values: Sequence[int], spatial_shape: Sequence[int], key: str) -> tuple[int, ...]:
    """A window/stride for this input: one entry per spatial axis, clamped to the axis size.

    A 3-entry setting used on 2D inputs keeps its last two entries (the in-plane ones), so one config
    serves both; fewer entries than spatial axes is an error naming the key.
    """
    n = len(spatial_shape)
    if len(values) < n:
        raise ConfigError(
            [f"`saliency.{key}` = {list(values)} has {len(values)} entries; the input has {n} spatial axes"]
        )
    return tuple(min(int(v), int(s)) for v, s in zip(list(values)[-n:], spatial_shape, strict=True))


# ------------------------------------------------------------------------------------ batch sizing
def measure_sample_bytes(scores: ClassScores, x: torch.Tensor, target: int) -> int:
    """Memory one sample's forward + backward needs.

    CUDA: the allocator's peak above what was allocated before (``torch.cuda.max_memory_allocated``).
    Elsewhere: twice the bytes autograd saves for the backward pass (activations, not parameters), found
    with ``saved_tensors_hooks`` -- the saved activations plus about as much again for their gradients.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        _forward_backward(scores, x, target)
        torch.cuda.synchronize(x.device)
        return max(1, torch.cuda.max_memory_allocated(x.device) - before)

    parameters = {p.data_ptr() for p in scores.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            saved[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _forward_backward(scores, x, target)
    return max(1, 2 * sum(saved.values()) + x.numel() * x.element_size())


def _forward_backward(scores: ClassScores, x: torch.Tensor, target: int) -> None:
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(scores(x)[:, target].sum(), x)
    del grad


def configured_budget_bytes(settings: SaliencyConfig) -> int:
    """``saliency.memory_budget_gb`` in bytes; 0 asks for the automatic budget (:func:`memory_budget`)."""
    return int(settings.memory_budget_gb * 1024**3)


def memory_budget(device: torch.device, budget_bytes: int = 0) -> int:
    """The bytes one attribution batch may use: the given budget, else the automatic one."""
    if budget_bytes > 0:
        return budget_bytes
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CUDA_FREE_SHARE * free)
    return CPU_BUDGET_BYTES


def auto_internal_batch_size(
    scores: ClassScores, x: torch.Tensor, target: int, *, limit: int, budget_bytes: int = 0
) -> int:
    """How many scaled inputs fit one batch: memory budget // one sample's measured cost, in [1, limit].

    The cost is measured once per model, input shape and device (a run's samples share them) and
    remembered for as long as the model lives.
    """
    measured = _MEASURED.setdefault(scores.classifier, {})
    key = (tuple(x.shape), x.dtype, str(x.device))
    if key not in measured:
        measured[key] = measure_sample_bytes(scores, x, target)
    fits = memory_budget(x.device, budget_bytes) // measured[key]
    return int(max(1, min(limit, fits)))


_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------- methods
def integrated_gradients_attribution(
    scores: ClassScores, x: torch.Tensor, target: int, *, n_steps: int, internal_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum IG from a zero baseline: attributions ``(1, C, *S)`` and the completeness error ``(1,)``
    (sum of attributions minus ``F(x) - F(0)``)."""
    attributions, delta = IntegratedGradients(scores).attribute(
        x,
        baselines=torch.zeros_like(x),
        target=target,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    return attributions, delta


def integrated_gradients(
    scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig
) -> np.ndarray:
    """Integrated gradients from a zero baseline (Captum), internal batch sized to fit memory."""
    batch = settings.internal_batch_size or auto_internal_batch_size(
        scores, x, target, limit=settings.ig_steps, budget_bytes=configured_budget_bytes(settings)
    )
    attributions, _delta = integrated_gradients_attribution(
        scores, x, target, n_steps=settings.ig_steps, internal_batch_size=batch
    )
    return _to_map(attributions.sum(dim=1))


def gradients(scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig) -> np.ndarray:
    """Plain input gradients (Captum Saliency), absolute values."""
    attributions = Saliency(scores).attribute(x, target=target, abs=True)  # (1, C, *S)
    return _to_map(attributions.amax(dim=1))


_NO_RELU_NOTED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def guided_backprop(
    scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig
) -> np.ndarray:
    """Guided backpropagation (Captum); changes ReLU backward passes only."""
    if scores.classifier not in _NO_RELU_NOTED and not any(isinstance(m, nn.ReLU) for m in scores.modules()):
        _NO_RELU_NOTED.add(scores.classifier)  # said once per model, not once per sample
        log("guided_backprop: the model has no nn.ReLU modules, so its maps equal plain gradients")
    attributions = GuidedBackprop(scores).attribute(x, target=target)  # (1, C, *S)
    return _to_map(attributions.sum(dim=1))


def gradcam(scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig) -> np.ndarray:
    """Grad-CAM on the encoder's last spatial layer (or saliency.gradcam_layer), upsampled to the input."""
    return _class_activation_map(scores, x, target, settings, elementwise=False)


def hirescam(scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig) -> np.ndarray:
    """HiResCAM on Grad-CAM's layer: gradient times activation at each position, summed over channels."""
    return _class_activation_map(scores, x, target, settings, elementwise=True)


def _class_activation_map(
    scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig, *, elementwise: bool
) -> np.ndarray:
    """``relu(sum_c weight_c * A_c)`` on the chosen layer, upsampled to the input: ``weight_c`` is the
    gradient averaged over positions (Grad-CAM) or the gradient at each position (HiResCAM)."""
    encoder = scores.classifier.encoder
    layer, layout = gradcam_target(encoder, settings.gradcam_layer)
    spatial = tuple(x.shape[2:])
    if layout is None:  # a chosen layer: read its output as tokens when it is (B, N, C)
        layout = "tokens" if _output_ndim(scores, layer, x) == 3 else "map"
    if layout == "tokens":
        grid = tuple(encoder.token_grid(spatial))
        cam = token_gradcam(scores, layer, grid, x, target, elementwise=elementwise)  # (1, 1, *grid)
    elif elementwise:
        products = LayerGradientXActivation(scores, layer).attribute(x, target=target)  # (1, C, *s)
        cam = torch.relu(products.sum(dim=1, keepdim=True))  # (1, 1, *s)
    else:
        cam = LayerGradCam(scores, layer).attribute(x, target=target, relu_attributions=True)  # (1, 1, *s)
    if cam.ndim != x.ndim:
        raise RunFailure(
            f"{'hirescam' if elementwise else 'gradcam'}: the layer gives {tuple(cam.shape)}, not a feature map (B, C, *spatial) "
            "for this input; token encoders need feature_layout = 'tokens'"
        )
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    return _to_map(LayerAttribution.interpolate(cam.float(), spatial, interpolate_mode=mode)[:, 0])


def gradcam_target(encoder: nn.Module, path: str) -> tuple[nn.Module, Literal["map", "tokens"] | None]:
    """The module Grad-CAM reads and its declared layout: the encoder's own ``gradcam_layer`` for an empty
    ``path`` or ``"last"``, else ``encoder.get_submodule(path)`` with the layout left to its output (None).
    (:func:`medctl.saliency.pipeline.run_saliency` resolves an empty ``saliency.gradcam_layer`` to a
    chosen layer first; see :mod:`medctl.saliency.layers`.)

    An unknown ``path`` is a ConfigError on ``saliency.gradcam_layer`` naming the closest module names.
    """
    if not path or path == "last":
        return encoder.gradcam_layer, getattr(
            encoder, "gradcam_layout", getattr(encoder, "feature_layout", "map")
        )
    try:
        return encoder.get_submodule(path), None
    except AttributeError:
        pass
    names = [name for name, _ in encoder.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    top = ", ".join(name for name, _ in encoder.named_children())
    nested = next((f", e.g. {name}" for name in names if "." in name), "")
    raise ConfigError(
        [
            f"`saliency.gradcam_layer` = {path!r}: {type(encoder).__name__} has no such module; {hint}"
            f"its top-level modules are {top} (name nested ones with dots{nested}; leave it empty to choose by lesion size)"
        ]
    )


_OUTPUT_NDIM: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _output_ndim(scores: ClassScores, layer: nn.Module, x: torch.Tensor) -> int:
    """The number of dimensions of ``layer``'s output: one forward pass without gradients on the first
    call for a layer, remembered for the next maps (the rank does not depend on the input size)."""
    if layer in _OUTPUT_NDIM:
        return _OUTPUT_NDIM[layer]
    shapes: list[int] = []

    def keep_ndim(_module: nn.Module, _inputs: object, output: object) -> None:
        shapes.append((output[0] if isinstance(output, tuple) else output).ndim)

    handle = layer.register_forward_hook(keep_ndim)
    try:
        with torch.no_grad():
            scores(x)
    finally:
        handle.remove()
    if not shapes:
        raise RunFailure(
            "gradcam: `saliency.gradcam_layer` is not used by the forward pass; choose another module"
        )
    _OUTPUT_NDIM[layer] = shapes[-1]
    return shapes[-1]


def token_gradcam(
    scores: ClassScores,
    layer: nn.Module,
    grid: tuple[int, ...],
    x: torch.Tensor,
    target: int,
    *,
    elementwise: bool = False,
) -> torch.Tensor:
    """Grad-CAM on tokens ``(B, N, C)``: ``relu(sum_c mean_n(dS/dA) * A)`` on the token grid ``(B, 1, *grid)``;
    ``elementwise`` keeps each token's own gradient (HiResCAM): ``relu(sum_c dS/dA * A)``.

    Tokens are assumed in row-major grid order after ``N - prod(grid)`` leading extra tokens (class or
    register tokens), which are dropped.
    """
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            score = scores(x)[:, target].sum()
            tokens = captured[-1]  # (B, N, C)
            (grads,) = torch.autograd.grad(score, tokens)
    finally:
        handle.remove()
    n_grid = math.prod(grid)
    if tokens.ndim != 3 or tokens.shape[1] < n_grid:
        raise RunFailure(
            f"gradcam: encoder.gradcam_layer gives {tuple(tokens.shape)}, not tokens (B, N, C) with at least "
            f"{n_grid} tokens for the grid {grid}"
        )
    tokens, grads = tokens[:, -n_grid:].detach(), grads[:, -n_grid:]  # (B, N', C)
    weights = grads if elementwise else grads.mean(dim=1, keepdim=True)  # (B, N' or 1, C)
    cam = torch.relu((weights * tokens).sum(dim=-1))  # (B, N')
    return cam.reshape(cam.shape[0], 1, *grid)  # (B, 1, *grid)


def occlusion(scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig) -> np.ndarray:
    """Occlusion with saliency.occlusion_window / occlusion_stride (Captum)."""
    spatial = tuple(x.shape[2:])
    window = spatial_window(settings.occlusion_window, spatial, "occlusion_window")
    stride = spatial_window(settings.occlusion_stride, spatial, "occlusion_stride")
    n_windows = math.prod((s - w) // t + 1 for s, w, t in zip(spatial, window, stride, strict=True))
    per_eval = settings.internal_batch_size or auto_internal_batch_size(
        scores,
        x,
        target,
        limit=min(n_windows, MAX_PERTURBATIONS_PER_EVAL),
        budget_bytes=configured_budget_bytes(settings),
    )
    channels = x.shape[1]
    attributions = Occlusion(scores).attribute(
        x,
        sliding_window_shapes=(channels, *window),
        strides=(channels, *stride),
        baselines=0.0,
        target=target,
        perturbations_per_eval=per_eval,
    )  # (1, C, *S)
    return _to_map(attributions.sum(dim=1))


def _to_map(attribution: torch.Tensor) -> np.ndarray:
    """``(1, *S)`` -> float32 numpy ``(*S)``."""
    return attribution[0].detach().float().cpu().numpy().astype(np.float32, copy=False)


MethodFn = Callable[[ClassScores, torch.Tensor, int, SaliencyConfig], np.ndarray]

METHODS: dict[str, MethodFn] = {
    "integrated_gradients": integrated_gradients,
    "gradients": gradients,
    "guided_backprop": guided_backprop,
    "gradcam": gradcam,
    "hirescam": hirescam,
    "occlusion": occlusion,
}


# Short names accepted wherever a method is named (``--method ig``); results use the full names.
METHOD_ALIASES = {"ig": "integrated_gradients", "grad": "gradients", "gbp": "guided_backprop"}


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Check ``saliency.methods`` against :data:`METHODS` (and :data:`METHOD_ALIASES`, resolved to
    full names); every unknown name is reported at once."""
    names = [METHOD_ALIASES.get(n, n) for n in names]
    problems = [f"`saliency.methods` has unknown method {n!r}" for n in names if n not in METHODS]
    if not names:
        problems = ["`saliency.methods` is empty"]
    if problems:
        known = (
            ", ".join(METHODS) + " (short: " + ", ".join(f"{a}={m}" for a, m in METHOD_ALIASES.items()) + ")"
        )
        raise ConfigError([f"{p}; known methods: {known}" for p in problems])
    return list(dict.fromkeys(names))


def compute_map(
    method: str, scores: ClassScores, x: torch.Tensor, target: int, settings: SaliencyConfig
) -> np.ndarray:
    """One method's map ``(*S)`` for input ``x`` ``(1, C, *S)`` and class ``target``.

    The model runs in eval mode with gradients on (even inside ``torch.no_grad``) and in-place
    activations switched off for the call (Captum's backward hooks cannot follow in-place ReLUs).
    """
    (name,) = resolve_methods([method])
    if x.ndim not in (4, 5) or x.shape[0] != 1:
        raise UserError(f"saliency needs one input (1, C, H, W) or (1, C, D, H, W), got {tuple(x.shape)}")
    x = x.detach().clone().requires_grad_(True)
    with _attribution_mode(scores), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU", category=UserWarning)
        return METHODS[name](scores, x, target, settings)


@contextlib.contextmanager
def _attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no in-place activations for the call; every module's own setting restored after."""
    modes = [(module, module.training) for module in model.modules()]
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    model.eval()
    for module in inplace:
        module.inplace = False
    try:
        yield
    finally:
        for module in inplace:
            module.inplace = True
        for module, training in modes:
            module.training = training
