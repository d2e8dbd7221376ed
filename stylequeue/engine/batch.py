"""Batched optimisation: several jobs of the same output size optimised in one VGG pass.

Each step stacks the items' images into one (B, 3, H, W) tensor, runs VGG once, and
backpropagates the SUM of the per-image losses. VGG19's features have no batch norm, so images
do not interact: item i's gradient is exactly its own loss's gradient. Each item keeps its own
image leaf, its own Adam (torch.optim.Adam, as stylize() uses) and its own iteration counter,
so its checkpoints are the single-job ones and resume alone with stylize().

L-BFGS is not separable (its line search and curvature pairs mix every coordinate), so a batch
of more than one L-BFGS job is refused with ConfigError: run those jobs one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.device import autocast, forward_of
from stylequeue.engine.images import fit_longest
from stylequeue.engine.losses import ContentLoss, LossTerms, StyleLoss, StyleTransferLoss
from stylequeue.engine.memory import fit_batch_size
from stylequeue.engine.state import OptimState
from stylequeue.engine.transfer import (  # the single-job building blocks, shared on purpose
    Progress,
    StyleResult,
    _after_step,
    _finish,
    _Job,
    _memory_format,
    _prepare_scale,
    _Run,
    _Scale,
    _set_up,
    _start_scale,
    scale_sizes,
    stylize,
)
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

# Settings that may differ between the items of one batch: they act on each item's own start,
# targets, averaging or cadence, never on the shared forward pass or the shared loss weights.
BATCH_FREE = ("seed", "init", "style_blend_weights", "ema_decay", "progress_every", "checkpoint_every")


@dataclass
class BatchItem:
    """One job of a batch: its images and its own callbacks and saved state."""

    content: Image.Image
    styles: Sequence[Image.Image]
    init_image: Image.Image | None = None
    config: StyleConfig | None = None  # None: the batch's config; else differs only in BATCH_FREE
    callback: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    resume: OptimState | None = None
    on_checkpoint: Callable[[OptimState], None] | None = None


@dataclass
class _Member:
    """An item while the batch runs: its job, current scale and run, and its result when done."""

    item: BatchItem
    job: _Job
    scale: _Scale | None = None
    run: _Run | None = None
    result: StyleResult | None = None


def batch_signature(config: StyleConfig) -> dict[str, Any]:
    """The settings every item of a batch must share (all but BATCH_FREE)."""
    return {k: v for k, v in config.to_dict().items() if k not in BATCH_FREE}


def output_sizes(content_size: tuple[int, int], config: StyleConfig) -> tuple[tuple[int, int], ...]:
    """(width, height) of the optimised image at each scale, coarse to fine: what must match."""
    sizes = scale_sizes(config.size, config.min_size, config.scales)
    return tuple(fit_longest(content_size, s) for s in sizes)


def stylize_batch(
    items: Sequence[BatchItem],
    config: StyleConfig,
    *,
    model: VGGFeatures,
    target_cache: TargetCache | None = None,
) -> list[StyleResult]:
    """Stylise every item together; results in the items' order, each as stylize() would give.

    Items must share ``config`` (up to BATCH_FREE) and output size, and start at the same scale.
    A stopped item (its ``should_stop`` said True) leaves the batch at once; the others go on.
    """
    if not items:
        return []
    configs = [_item_config(item, config) for item in items]
    if len(items) == 1:
        item = items[0]
        return [stylize(item.content, item.styles, configs[0], model=model, init_image=item.init_image,
                        callback=item.callback, should_stop=item.should_stop, resume=item.resume,
                        on_checkpoint=item.on_checkpoint, target_cache=target_cache)]
    if config.optimizer != "adam":
        raise ConfigError(
            f"batching needs Adam (each image keeps its own elementwise state); {config.optimizer} "
            "couples every pixel of the batch: run L-BFGS jobs one at a time (batch size 1)"
        )
    members = [_Member(item, _set_up(item.content, item.styles, cfg, model, item.init_image, target_cache))
               for item, cfg in zip(items, configs)]
    first = _first_scale(items)
    for index in range(first, len(members[0].job.sizes)):
        live = [m for m in members if m.result is None]
        for m in live:
            m.scale = _prepare_scale(m.job, index)
            m.run = _start_scale(m.job, m.scale, m.run, m.item.resume if index == first else None)
        _check_same_shape(live)
        _run_scale_batch(live, index)
    for m in members:
        if m.result is None:
            assert m.scale is not None and m.run is not None
            m.result = _finish(m.job, m.scale, m.run, False, m.item.callback)
    results = [m.result for m in members if m.result is not None]
    for result in results:
        result.batch_size = len(members)
    return results


def stylize_many(
    items: Sequence[BatchItem],
    config: StyleConfig,
    *,
    model: VGGFeatures,
    max_batch: int,
    target_cache: TargetCache | None = None,
) -> list[StyleResult]:
    """stylize_batch() in chunks that fit the GPU: sized by memory.fit_batch_size, halved on OOM.

    A chunk that runs out of memory is run again from its items' own start (``resume``), so
    its callbacks may see iterations twice; results are unaffected.
    """
    if not items:
        return []
    device = next(model.parameters()).device
    width, height = output_sizes(items[0].content.size, config)[-1]
    layers = [*config.content_layers, *config.style_layers]
    dtype_bytes = 4 if config.precision == "fp32" or device.type != "cuda" else 2
    size = fit_batch_size(height, width, layers, device, cap=max_batch, dtype_bytes=dtype_bytes)
    results: list[StyleResult] = []
    while len(results) < len(items):
        chunk = items[len(results) : len(results) + size]
        try:
            results += stylize_batch(chunk, config, model=model, target_cache=target_cache)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _item_config(item: BatchItem, config: StyleConfig) -> StyleConfig:
    own = config if item.config is None else item.config
    if own is not config:
        mine, shared = batch_signature(own), batch_signature(config)
        changed = sorted(k for k in shared if mine.get(k) != shared.get(k))
        if changed:
            raise ConfigError(
                f"a batch item differs from the batch's settings in {changed}; only {list(BATCH_FREE)} "
                "may differ: run that job in another batch"
            )
    return own.validate()


def _first_scale(items: Sequence[BatchItem]) -> int:
    starts = {item.resume.scale_index if item.resume is not None else 0 for item in items}
    if len(starts) > 1:
        raise ConfigError(f"batch items resume at different scales {sorted(starts)}; batch them by scale")
    return starts.pop()


def _check_same_shape(members: Sequence[_Member]) -> None:
    shapes = {tuple(m.scale.content.shape[-2:]) for m in members if m.scale is not None}
    if len(shapes) > 1:
        raise ConfigError(
            f"batch items have different output sizes {sorted(shapes)} (height, width); "
            "batch only jobs whose contents give the same size (see output_sizes())"
        )


def _run_scale_batch(members: list[_Member], index: int) -> None:
    """The inner loop for one scale, all items at once; finished or stopped items drop out."""
    end = (index + 1) * members[0].job.config.iterations  # the items share ``iterations``
    active = [m for m in members if m.run is not None and m.run.iteration < end]
    objective: StyleTransferLoss | None = None
    while active:
        still = [m for m in active if not _stopped(m)]
        if not still:
            return
        if objective is None or len(still) != len(active):
            # Rebuilt only when the batch shrinks: the targets of the remaining items, stacked.
            objective = stack_objectives([m.scale.objective for m in still if m.scale is not None])
        active = still
        _batched_step(active, objective)
        for m in active:
            assert m.scale is not None and m.run is not None
            _after_step(m.job, m.scale, m.run, m.item.callback, m.item.on_checkpoint)
        active = [m for m in active if m.run is not None and m.run.iteration < end]


def _stopped(m: _Member) -> bool:
    """Poll the item's should_stop; a stopped item is finished now, with its state where it stopped."""
    if m.item.should_stop is None or not m.item.should_stop():
        return False
    assert m.scale is not None and m.run is not None
    m.result = _finish(m.job, m.scale, m.run, True, m.item.callback)
    return True


def _batched_step(active: list[_Member], objective: StyleTransferLoss) -> None:
    """One step for every active item: one forward and backward over the stacked images, then
    each item's own optimiser step (the same calls, in the same order, as optim.optimizer_step)."""
    job = active[0].job
    runs = [m.run for m in active if m.run is not None]
    for run in runs:
        run.optimizer.zero_grad(set_to_none=True)
    images = torch.cat([run.image for run in runs])  # (B, 3, H, W); backward splits the gradient
    normalized = job.config.space == "normalized"
    with autocast(job.plan):
        features = forward_of(job.model, job.plan)(_memory_format(images, job.plan), objective.layers,
                                                   normalized=normalized)
    pixels = job.model.denormalize(images) if normalized else images
    terms = objective(features, pixels)
    terms.total.sum().backward()
    detached = [t.detach() for t in (terms.total, terms.content, terms.style, terms.tv)]
    for k, run in enumerate(runs):
        run.optimizer.step()
        if job.config.space == "pixel":
            with torch.no_grad():
                run.image.clamp_(0, 1)
        run.last = LossTerms(*(t[k : k + 1] for t in detached))  # each (1,), as a solo run's


def stack_objectives(objectives: Sequence[StyleTransferLoss]) -> StyleTransferLoss:
    """One loss over a batch: each layer's targets concatenated along the batch dimension.

    Weights and layers come from the first objective; the items of a batch share them.
    """
    first = objectives[0]
    content = {
        name: (ContentLoss(torch.cat([o.content_losses[name].target for o in objectives])), w)
        for name, w in first.content_layer_weights.items()
    }  # targets (B, C, h, w)
    style = {
        name: (StyleLoss(torch.cat([o.style_losses[name].target for o in objectives]),
                         first.style_losses[name].norm), w)
        for name, w in first.style_layer_weights.items()
    }  # targets (B, C, C)
    return StyleTransferLoss(content, style, content_weight=first.content_weight,
                             style_weight=first.style_weight, tv_weight=first.tv_weight)


__all__ = ["BATCH_FREE", "BatchItem", "batch_signature", "output_sizes", "stack_objectives", "stylize_batch",
           "stylize_many"]
