"""The optimisation loop of Gatys et al. (2015): scales, coarse to fine, and steps within each.

There is one loop, and its unit is a batch of members: ``stylize()`` is a batch of one, and
``stylize_batch()`` runs several jobs of one size through one forward and backward pass per step
(VGG's feature layers have no batch norm, so the images never interact: each item's gradient is
that of its own loss, and each keeps its own optimiser, cadence, checkpoints and result). Adam
steps each item separately; L-BFGS, whose line search couples every coordinate, runs one member.

Targets (content features, style Gram matrices) are fixed per scale (objective.py); each step
runs VGG only up to the deepest layer the losses read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from stylequeue.engine import color
from stylequeue.engine.config import BATCH_FREE, StyleConfig, differences
from stylequeue.engine.device import autocast, forward_of
from stylequeue.engine.losses import LossTerms, StyleTransferLoss
from stylequeue.engine.memory import activation_bytes
from stylequeue.engine.memory import max_batch as fit_batch
from stylequeue.engine.objective import Problem, Scale, TileShare, prepare_scale, set_up, stack_objectives
from stylequeue.engine.optim import carry_up, make_optimizer, to_cpu
from stylequeue.engine.result import Progress, StyleResult
from stylequeue.engine.state import OptimState
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.tensors import memory_format, to_pil, to_tensor
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError, NonFiniteLossError


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
    share: TileShare | None = None  # a tile's weights and Gram shift (tiled.py)


@dataclass
class _Run:
    """What changes from step to step; what an OptimState records."""

    image: torch.Tensor  # leaf, in the optimised space
    optimizer: torch.optim.Optimizer
    ema: torch.Tensor | None
    iteration: int  # counted over all scales
    history: list[dict[str, Any]]
    last: LossTerms | None = None
    steps_this_session: int = 0


@dataclass
class _Member:
    """An item while the batch runs: its problem, current scale and run, and its result when done."""

    item: BatchItem
    problem: Problem
    scale: Scale | None = None
    run: _Run | None = None
    result: StyleResult | None = None


def stylize(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    *,
    model: VGGFeatures,
    init_image: Image.Image | None = None,
    callback: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: OptimState | None = None,
    on_checkpoint: Callable[[OptimState], None] | None = None,
    target_cache: TargetCache | None = None,
    last_scale: int | None = None,
    share: TileShare | None = None,
) -> StyleResult:
    """Stylise ``content`` with ``styles`` (PIL RGB images) under ``config``; see docs/architecture.md.

    ``resume`` continues a saved state: mid-scale, or from the end of a finished scale, which is
    carried up to the next. ``last_scale`` stops after that scale (the service runs one scale per
    task). ``target_cache`` keeps style targets for later jobs; the result is the same without it.
    """
    item = BatchItem(content, styles, init_image, None, callback, should_stop, resume, on_checkpoint, share)
    return stylize_batch([item], config, model=model, target_cache=target_cache, last_scale=last_scale)[0]


def stylize_batch(
    items: Sequence[BatchItem],
    config: StyleConfig,
    *,
    model: VGGFeatures,
    target_cache: TargetCache | None = None,
    last_scale: int | None = None,
) -> list[StyleResult]:
    """Stylise every item together; results in the items' order, each as stylize() would give.

    Items must share ``config`` (up to BATCH_FREE) and output size, and start at the same scale.
    A stopped item (its ``should_stop`` said True) leaves the batch at once; the others go on.
    """
    if not items:
        return []
    configs = [_item_config(item, config) for item in items]
    if len(items) > 1 and config.optimizer != "adam":
        raise ConfigError(
            f"batching needs Adam (each image keeps its own elementwise state); {config.optimizer} "
            "couples every pixel of the batch: run L-BFGS jobs one at a time (batch size 1)"
        )
    members = [_Member(item, set_up(item.content, item.styles, cfg, model, item.init_image, target_cache,
                                          item.share))
               for item, cfg in zip(items, configs)]
    last = len(config.scale_sizes) - 1 if last_scale is None else last_scale
    first = _first_scale(items, config, last)
    for index in range(first, last + 1):
        live = [m for m in members if m.result is None]
        if not live:
            break  # every item stopped
        for m in live:
            m.scale = prepare_scale(m.problem, index)
            m.run = _start_scale(m.problem, m.scale, m.run, m.item.resume if index == first else None)
        _check_same_shape(live)
        _run_scale(live, index)
    for m in members:
        if m.result is None:
            m.result = _finish(m, stopped=False)
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
    last_scale: int | None = None,
) -> list[StyleResult]:
    """stylize_batch() in chunks that fit the GPU: sized by memory.max_batch, halved on OOM.

    A chunk that runs out of memory is run again from its items' own start (``resume``), so
    its callbacks may see iterations twice; results are unaffected.
    """
    if not items:
        return []
    device = next(model.parameters()).device
    width, height = config.output_sizes(items[0].content.size)[-1]
    layers = [*config.content_layers, *config.style_layers]
    dtype_bytes = 4 if config.precision == "fp32" or device.type != "cuda" else 2
    size = max(1, max_batch)
    if device.type == "cuda" and max_batch > 1:  # what fits on the device now
        per_image = activation_bytes(height, width, layers, dtype_bytes=dtype_bytes, network=model.network)
        size = fit_batch(torch.cuda.mem_get_info(device)[0], per_image, cap=max_batch)
    results: list[StyleResult] = []
    while len(results) < len(items):
        chunk = items[len(results) : len(results) + size]
        try:
            results += stylize_batch(chunk, config, model=model, target_cache=target_cache, last_scale=last_scale)
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
        changed = differences(own.to_dict(), config.to_dict(), BATCH_FREE)
        if changed:
            raise ConfigError(
                f"a batch item differs from the batch's settings in {changed}; only {list(BATCH_FREE)} "
                "may differ: run that job in another batch"
            )
    return own.validate()


def start_scale(resume: OptimState | None, config: StyleConfig, last: int) -> int:
    """The scale a run starts at: 0, a saved state's own scale, or the next one after a finished
    scale (what a chain step resumes from its predecessor's final state)."""
    if resume is None:
        return 0
    if resume.scale_finished(config.iterations) and resume.scale_index < last:
        return resume.scale_index + 1
    return resume.scale_index


def _first_scale(items: Sequence[BatchItem], config: StyleConfig, last: int) -> int:
    starts = {start_scale(item.resume, config, last) for item in items}
    if len(starts) > 1:
        raise ConfigError(f"batch items resume at different scales {sorted(starts)}; batch them by scale")
    first = starts.pop()
    if first > last:
        raise ConfigError(f"the saved state is at scale {first}, past the last scale asked for ({last})")
    return first


def _check_same_shape(members: Sequence[_Member]) -> None:
    shapes = {tuple(m.scale.content.shape[-2:]) for m in members if m.scale is not None}
    if len(shapes) > 1:
        raise ConfigError(
            f"batch items have different output sizes {sorted(shapes)} (height, width); "
            "batch only jobs whose contents give the same size (see StyleConfig.output_sizes())"
        )


def _start_scale(problem: Problem, scale: Scale, previous: _Run | None, resume: OptimState | None) -> _Run:
    """The image and optimiser at the start of a scale: fresh, restored, or carried up."""
    cfg, device = problem.config, problem.plan.device
    size = tuple(scale.content.shape[-2:])
    if resume is not None and resume.scale_index == scale.index:
        resume.check_resumes(cfg, size)
        # Copies throughout: the caller's OptimState must survive this run unchanged.
        image = resume.image.to(device, copy=True).requires_grad_(True)
        optimizer = make_optimizer(cfg, image)
        optimizer.load_state_dict(copy.deepcopy(resume.optimizer_state))
        ema = resume.ema_image.to(device, copy=True) if resume.ema_image is not None else None
        return _Run(image, optimizer, ema, resume.iteration, list(resume.history))
    if resume is not None:
        # The end of the previous scale, saved elsewhere (the service's previous chain step).
        resume.check_resumes(cfg)
        ema = resume.ema_image.to(device) if resume.ema_image is not None else None
        image, optimizer, ema = carry_up(cfg, resume.image.to(device), resume.optimizer_state, ema, size)
        return _Run(image, optimizer, ema, resume.iteration, list(resume.history))
    if previous is None:
        image = _to_space(problem, _initial_image(problem, scale)).requires_grad_(True)
        ema = image.detach().clone() if cfg.ema_decay > 0 else None
        return _Run(image, make_optimizer(cfg, image), ema, 0, [])
    image, optimizer, ema = carry_up(cfg, previous.image, previous.optimizer.state_dict(), previous.ema, size)
    return dataclasses.replace(previous, image=image, optimizer=optimizer, ema=ema)


def _initial_image(problem: Problem, scale: Scale) -> torch.Tensor:
    """(1, 3, H, W) pixels: the content, seeded noise, or the given image resized to the content."""
    cfg = problem.config
    if cfg.init == "content":
        return scale.content.clone()
    if cfg.init == "noise":
        # Drawn on the CPU from its own generator: the same seed gives the same noise on any device.
        generator = torch.Generator().manual_seed(cfg.seed)
        image = (torch.rand(scale.content.shape, generator=generator) * 0.5 + 0.25).to(problem.plan.device)
    else:
        assert problem.init_image is not None
        h, w = scale.content.shape[-2:]
        image = to_tensor(problem.init_image.resize((w, h), Image.Resampling.LANCZOS), problem.plan.device)
    # Luminance-only transfer optimises a grey image, whatever it starts from.
    return color.as_gray_rgb(color.luminance(image)) if cfg.original_colors else image


def _run_scale(members: list[_Member], index: int) -> None:
    """The inner loop for one scale, all members at once; finished or stopped members drop out."""
    end = (index + 1) * members[0].problem.config.iterations  # the members share ``iterations``
    active = [m for m in members if m.run is not None and m.run.iteration < end]
    objective: StyleTransferLoss | None = None
    while active:
        still = [m for m in active if not _stopped(m)]
        if not still:
            return
        if objective is None or len(still) != len(active):
            # Rebuilt only when the batch shrinks: the targets of the remaining members, stacked.
            scales = [m.scale for m in still if m.scale is not None]
            objective = scales[0].objective if len(scales) == 1 else stack_objectives([s.objective for s in scales])
        active = still
        _step(active, objective)
        for m in active:
            _after_step(m)
        active = [m for m in active if m.run is not None and m.run.iteration < end]


def _stopped(m: _Member) -> bool:
    """Poll the item's should_stop; a stopped item is finished now, with its state where it stopped."""
    if m.item.should_stop is None or not m.item.should_stop():
        return False
    m.result = _finish(m, stopped=True)
    return True


def _step(members: list[_Member], objective: StyleTransferLoss) -> None:
    """One iteration for every member: one forward and backward over the stacked images, then each
    member's own optimiser step. Records each member's loss terms before the update, (1,) each."""
    problem = members[0].problem
    runs = [m.run for m in members if m.run is not None]
    recorded: list[LossTerms] = []
    box = problem.config.loss_box

    def closure() -> torch.Tensor:
        for run in runs:
            run.optimizer.zero_grad(set_to_none=True)
        images = runs[0].image if len(runs) == 1 else torch.cat([run.image for run in runs])  # (B, 3, H, W)
        terms = _evaluate(problem, objective, images)
        total = terms.total.sum()  # per-image losses are independent: the sum has per-image gradients
        total.backward()
        if box is not None:
            for run in runs:
                _keep_box(run.image.grad, box)
        recorded.append(LossTerms(*(t.detach() for t in (terms.total, terms.content, terms.style, terms.tv))))
        return total

    if isinstance(runs[0].optimizer, torch.optim.LBFGS):
        runs[0].optimizer.step(closure)  # one member: see stylize_batch
    else:
        closure()
        for run in runs:
            run.optimizer.step()
    if problem.config.space == "pixel":
        with torch.no_grad():
            for run in runs:
                run.image.clamp_(0, 1)
    terms = recorded[-1]
    for k, run in enumerate(runs):
        run.last = terms if len(runs) == 1 else LossTerms(*(t[k : k + 1] for t in (terms.total, terms.content,
                                                                            terms.style, terms.tv)))


def _keep_box(grad: torch.Tensor | None, box: tuple[int, int, int, int]) -> None:
    """Zero ``grad`` outside the loss box: the context around a tile is the picture as it stands,
    not pixels to optimise. Adam scales every pixel's step to ~lr however small its gradient, so
    context pixels, whose only gradient is what leaks back through the tile's receptive field,
    would otherwise move as much as the tile's own, and the tile would fit itself to a context
    that its neighbours' tiles never produce."""
    if grad is None:
        return
    left, top, right, bottom = box
    mask = torch.zeros(grad.shape[-2:], dtype=torch.bool, device=grad.device)
    mask[top:bottom, left:right] = True
    grad.masked_fill_(~mask, 0)


def _evaluate(problem: Problem, objective: StyleTransferLoss, images: torch.Tensor) -> LossTerms:
    """Loss of the current images: one VGG forward (cut at the deepest layer), then the losses."""
    normalized = problem.config.space == "normalized"
    forward = forward_of(problem.model, problem.plan)
    with autocast(problem.plan):
        features = forward(memory_format(images, problem.plan), objective.layers, normalized=normalized)
    pixels = problem.model.denormalize(images) if normalized else images
    return objective(features, pixels)


def _after_step(m: _Member) -> None:
    """Count the step, average the iterate, report and checkpoint on their cadence (no sync else)."""
    cfg, run = m.problem.config, m.run
    assert run is not None
    run.iteration += 1
    run.steps_this_session += 1
    if run.ema is not None:
        # Iterate averaging: the average of recent iterates is smoother than the last one.
        run.ema.mul_(cfg.ema_decay).add_(run.image.detach(), alpha=1 - cfg.ema_decay)
    if run.iteration % cfg.progress_every == 0 or run.iteration == cfg.total_iterations:
        _report(m)
    if m.item.on_checkpoint is not None and cfg.checkpoint_every and run.iteration % cfg.checkpoint_every == 0:
        m.item.on_checkpoint(_state(m))


def _report(m: _Member) -> None:
    """Pull the losses to the host (the only sync), record history, call the callback."""
    problem, scale, run = m.problem, m.scale, m.run
    assert scale is not None and run is not None
    if run.last is None or (run.history and run.history[-1]["iteration"] == run.iteration):
        return
    cfg = problem.config
    elapsed = time.perf_counter() - problem.started
    its = run.steps_this_session / elapsed if elapsed > 0 else 0.0
    losses = {k: float(getattr(run.last, k).sum().item()) for k in ("total", "content", "style", "tv")}
    if not all(math.isfinite(v) for v in losses.values()):
        raise NonFiniteLossError(
            f"the loss became {losses['total']} by iteration {run.iteration} (content {losses['content']}, "
            f"style {losses['style']}, tv {losses['tv']}): a weight or the learning rate is too large for "
            f"float32 (content_weight {cfg.content_weight:g}, style_weight {cfg.style_weight:g}, tv_weight "
            f"{cfg.tv_weight:g}, lr {cfg.lr:g}); lower it"
        )
    run.history.append(
        {"iteration": run.iteration, "scale_index": scale.index, "loss": losses["total"],
         "content_loss": losses["content"], "style_loss": losses["style"], "tv_loss": losses["tv"],
         "elapsed_s": round(elapsed, 4)}
    )
    callback = m.item.callback
    if callback is None:
        return
    snapshot = _output_tensor(run).detach().clone()
    height, width = snapshot.shape[-2:]
    remaining = cfg.total_iterations - run.iteration
    callback(
        Progress(
            iteration=run.iteration, total=cfg.total_iterations, scale_index=scale.index,
            num_scales=len(problem.sizes), width=int(width), height=int(height), loss=losses["total"],
            content_loss=losses["content"], style_loss=losses["style"], tv_loss=losses["tv"],
            elapsed_s=elapsed, its_per_s=its, eta_s=remaining / its if its > 0 else math.inf,
            preview=lambda: to_pil(_to_pixels(problem, scale, snapshot)),
        )
    )


def _finish(m: _Member, *, stopped: bool) -> StyleResult:
    problem, scale, run = m.problem, m.scale, m.run
    assert scale is not None and run is not None
    _report(m)
    optimize_s = time.perf_counter() - problem.started
    image = to_pil(_to_pixels(problem, scale, _output_tensor(run).detach()))
    return StyleResult(
        image=image,
        config=problem.config,
        history=run.history,
        timings={"total_s": round(optimize_s, 4), "iterations": run.steps_this_session,
                 "s_per_iteration": round(optimize_s / max(run.steps_this_session, 1), 6)},
        device=str(problem.plan.device),
        precision=problem.plan.precision,
        stopped=stopped,
        state=_state(m),
        weights_info=problem.model.info,
    )


def _state(m: _Member) -> OptimState:
    run, scale = m.run, m.scale
    assert run is not None and scale is not None
    return OptimState(
        image=to_cpu(run.image),
        optimizer_state=to_cpu(run.optimizer.state_dict()),
        iteration=run.iteration,
        scale_index=scale.index,
        config=m.problem.config.to_dict(),
        ema_image=to_cpu(run.ema) if run.ema is not None else None,
        history=[dict(h) for h in run.history],
    )


def _output_tensor(run: _Run) -> torch.Tensor:
    return run.ema if run.ema is not None else run.image


def _to_space(problem: Problem, pixels: torch.Tensor) -> torch.Tensor:
    return problem.model.normalize(pixels) if problem.config.space == "normalized" else pixels


def _to_pixels(problem: Problem, scale: Scale, image: torch.Tensor) -> torch.Tensor:
    """Optimised tensor -> (1, 3, H, W) RGB in [0, 1], with the content's colours if asked."""
    pixels = problem.model.denormalize(image) if problem.config.space == "normalized" else image
    pixels = pixels.float().clamp(0, 1)
    if problem.config.original_colors:
        pixels = color.combine_luminance(pixels, scale.content_color)
    return pixels
