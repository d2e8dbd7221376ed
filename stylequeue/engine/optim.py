"""Optimisers, one optimisation step, and carrying Adam's state to a larger scale."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.losses import LossTerms

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


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    evaluate: Callable[[torch.Tensor], LossTerms],
    *,
    clamp: bool,
) -> LossTerms:
    """One iteration; returns the (detached) loss terms at the point before the update."""
    last: list[LossTerms] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        terms = evaluate(image)
        total = terms.total.sum()  # per-image losses are independent, so sum them
        total.backward()
        last.append(_detach(terms))
        return total

    if isinstance(optimizer, torch.optim.LBFGS):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    if clamp:
        with torch.no_grad():
            image.clamp_(0, 1)
    return last[-1]


def _detach(terms: LossTerms) -> LossTerms:
    return LossTerms(*(t.detach() for t in (terms.total, terms.content, terms.style, terms.tv)))


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


def to_cpu(value: Any) -> Any:
    """Deep copy of a (nested) optimiser state with every tensor cloned onto the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
