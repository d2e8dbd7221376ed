"""Optimisers, and carrying an optimisation up to the next, larger scale."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from stylequeue.engine.config import StyleConfig

# L-BFGS memory: jcjohnson/neural-style keeps 100 corrections; 50 halves the memory at little cost.
LBFGS_HISTORY = 50


def make_optimizer(config: StyleConfig, image: torch.Tensor) -> torch.optim.Optimizer:
    """Adam or L-BFGS over the single image tensor.

    L-BFGS takes one iteration per ``step()`` (its history persists in the state), so that
    progress, cancellation and checkpoints work per iteration for both optimisers. With
    max_iter=1 each step evaluates the loss exactly once, like Adam. Torch's L-BFGS only
    updates its curvature memory when y.s > 1e-10, so losses should be of ordinary size
    (set the weights accordingly); Adam is indifferent to the loss's scale.
    """
    if config.optimizer == "adam":
        return torch.optim.Adam([image], lr=config.lr, betas=config.betas)
    # Tolerances 0: the iteration budget decides when to stop, never the loss's absolute scale
    # (which the layer weights set arbitrarily).
    return torch.optim.LBFGS(
        [image], lr=config.lr, max_iter=1, history_size=LBFGS_HISTORY,
        tolerance_grad=0.0, tolerance_change=0.0,
    )


def resize_image(image: torch.Tensor, size: tuple[int, int], *, clamp: bool) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W), bicubic; pixel-space images are clamped back to [0, 1]."""
    out = F.interpolate(image, size=size, mode="bicubic", align_corners=False)
    return out.clamp(0, 1) if clamp else out


def carry_optimizer_state(
    old_state: dict[str, Any], new_optimizer: torch.optim.Optimizer, size: tuple[int, int]
) -> None:
    """Load Adam's moments, resized to the new image size, into ``new_optimizer``.

    exp_avg is resized bicubically; exp_avg_sq bilinearly, which keeps it non-negative.
    L-BFGS's curvature history does not transfer between sizes: it starts fresh.
    """
    if not isinstance(new_optimizer, torch.optim.Adam) or not old_state.get("state"):
        return
    state = copy.deepcopy(old_state)
    for param_state in state["state"].values():
        param_state["exp_avg"] = F.interpolate(
            param_state["exp_avg"], size=size, mode="bicubic", align_corners=False
        )
        param_state["exp_avg_sq"] = F.interpolate(
            param_state["exp_avg_sq"], size=size, mode="bilinear", align_corners=False
        )
    new_optimizer.load_state_dict(state)


def carry_up(
    config: StyleConfig,
    image: torch.Tensor,
    optimizer_state: dict[str, Any],
    ema: torch.Tensor | None,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.optim.Optimizer, torch.Tensor | None]:
    """A finished scale's image, optimiser and averaged image, continued at an (H, W) ``size``.

    The one rule for moving up a scale, whether the previous scale ran in this call or was saved
    by another process (a chain step): the image is resized bicubically (clamped in pixel space),
    Adam's moments as :func:`carry_optimizer_state` says. Returns the new leaf tensor (requires
    grad), a fresh optimiser over it holding the carried state, and the resized EMA.
    """
    clamp = config.space == "pixel"
    carried = resize_image(image.detach(), size, clamp=clamp).requires_grad_(True)
    optimizer = make_optimizer(config, carried)
    carry_optimizer_state(optimizer_state, optimizer, size)
    carried_ema = resize_image(ema, size, clamp=clamp) if ema is not None else None
    return carried, optimizer, carried_ema


def to_cpu(value: Any) -> Any:
    """Deep copy of a (nested) optimiser state with every tensor cloned onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
