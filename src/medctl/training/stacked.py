"""Many copies of one small module trained at once: stacked weights, one vectorised call, one optimiser.

A probe grid (:mod:`medctl.finetune.grid`) trains G copies of the same heads, each at its own learning
rate and weight decay, on the same batches. Following PyTorch's model-ensembling recipe
(``torch.func.stack_module_state`` + ``vmap``), :class:`Stacked` keeps each parameter of the copies as one
tensor with a leading member axis (G, ...) and runs all members in one vectorised call, so one batch read
feeds every member and the cost does not grow with G in Python calls. Dropout draws the same mask for every
member (``randomness="same"``), the mask a single copy would draw, so each member trains exactly as the
module would alone.

:class:`StackedAdamW` is ``torch.optim.AdamW`` for such tensors with a per-member learning rate and weight
decay, per-member gradient clipping (``clip_grad_norm_`` over one member's parameters) and a mask of active
members: a member whose early stopping fired keeps its weights and optimiser state, as a run that stopped
would. The group's ``lr`` is the schedule's factor (base 1.0); member ``g`` steps with ``lr * lrs[g]``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class Stacked(nn.Module):
    """G copies of ``module`` as stacked parameters: ``forward(x)`` returns the module's output with a member
    axis inserted at dim 1 (a ``(B, K)`` output becomes ``(B, G, K)``), so batch-first readers still work."""

    def __init__(self, module: nn.Module, members: int):
        super().__init__()
        if members < 1:
            raise ValueError(f"a stack needs at least one member, got {members}")
        copies = [copy.deepcopy(module) for _ in range(members)]
        params, buffers = stack_module_state(copies)  # every copy starts from the same weights
        self.members = members
        self.names = list(params)
        self.buffer_names = list(buffers)
        self.params = nn.ParameterList(nn.Parameter(params[name].detach().clone()) for name in self.names)  # (G, ...)
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[name].clone())  # (G, ...)
        self.skeleton = [copy.deepcopy(module).to("meta")]  # a list: no weights of its own in the state dict

    def stacked_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"buffer_{i}") for i, name in enumerate(self.buffer_names)}

    def forward(self, *inputs: torch.Tensor) -> Any:
        params = dict(zip(self.names, self.params, strict=True))
        skeleton = self.skeleton[0].train(self.training)

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *x: torch.Tensor) -> Any:
            return functional_call(skeleton, (p, b), x)

        in_dims = (0, 0, *([None] * len(inputs)))
        return vmap(one, in_dims=in_dims, out_dims=1, randomness="same")(params, self.stacked_buffers(), *inputs)

    def member_state(self, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s state dict, keyed as ``module``'s own (load it into the original module)."""
        state = {name: p[member].detach().clone() for name, p in zip(self.names, self.params, strict=True)}
        return state | {name: b[member].clone() for name, b in self.stacked_buffers().items()}

    def decays(self) -> list[bool]:
        """Per stacked parameter: does weight decay apply (not to biases and 1-d tensors, as
        :func:`medctl.training.optim.param_groups_with_decay` decides for the module itself)."""
        return [not (p.ndim - 1 <= 1 or name.endswith(".bias")) for name, p in zip(self.names, self.params, strict=True)]


class StackedAdamW(torch.optim.Optimizer):
    """AdamW over :class:`Stacked` parameters, member ``g`` at ``lr * lrs[g]`` and weight decay ``weight_decays[g]``.

    The update is ``torch.optim.AdamW``'s (single-tensor form), per member; ``max_norm > 0`` clips each
    member's gradient to that norm over its own parameters first. ``active`` (G,) bool: members set to False
    are left exactly as they are (weights, moments).
    """

    def __init__(
        self,
        stacked: Stacked,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        *,
        active: torch.Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_norm: float = 0.0,
    ):
        if len(lrs) != stacked.members or len(weight_decays) != stacked.members:
            raise ValueError(f"{stacked.members} members but {len(lrs)} lrs and {len(weight_decays)} weight decays")
        device = stacked.params[0].device
        decays = stacked.decays()
        groups = [
            {"params": [p for p, d in zip(stacked.params, decays, strict=True) if d == decay], "decay": decay, "name": name}
            for decay, name in ((True, "grid.decay"), (False, "grid.no_decay"))
        ]
        super().__init__([g for g in groups if g["params"]], {"lr": 1.0, "betas": betas, "eps": eps})
        self.member_lrs = torch.tensor(list(lrs), dtype=torch.float32, device=device)  # (G,)
        self.member_wds = torch.tensor(list(weight_decays), dtype=torch.float32, device=device)  # (G,)
        # (G,) bool, shared with whoever stops members (and restores it on resume)
        self.active = active if active is not None else torch.ones(stacked.members, dtype=torch.bool, device=device)
        self.max_norm = max_norm

    def member_grad_norms(self) -> torch.Tensor:
        """(G,) each member's gradient norm over all its parameters (as ``clip_grad_norm_`` would compute it)."""
        grads = [p.grad.flatten(1) for group in self.param_groups for p in group["params"] if p.grad is not None]
        return torch.cat(grads, dim=1).float().norm(dim=1)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - the Optimizer signature
        clip = None
        if self.max_norm > 0:
            clip = (self.max_norm / (self.member_grad_norms() + 1e-6)).clamp(max=1.0)  # (G,)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.ndim - 1)  # a (G,) vector against (G, ...)
                grad = p.grad if clip is None else p.grad * clip.view(shape).to(p.grad.dtype)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)  # (G,)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                active = self.active.view(shape)
                lr = (group["lr"] * self.member_lrs).view(shape)
                wd = self.member_wds.view(shape) if group["decay"] else torch.zeros_like(lr)
                step = state["step"] + self.active.float()  # (G,): stopped members do not count
                bias1 = (1 - beta1 ** step).view(shape)
                bias2_sqrt = (1 - beta2 ** step).sqrt().view(shape)
                exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
                denom = exp_avg_sq.sqrt() / bias2_sqrt + group["eps"]
                updated = p * (1 - lr * wd) - (lr / bias1) * exp_avg / denom
                p.copy_(torch.where(active, updated, p))
                state["exp_avg"] = torch.where(active, exp_avg, state["exp_avg"])
                state["exp_avg_sq"] = torch.where(active, exp_avg_sq, state["exp_avg_sq"])
                state["step"] = step
