"""stylize(): set-up, the per-scale loop and the inner loop of Gatys et al.'s optimisation.

Targets (content features, style Gram matrices) are computed once per scale under no_grad;
each step runs VGG only up to the deepest layer the losses read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

from stylequeue.engine import color
from stylequeue.engine.config import StyleConfig, layer_weights
from stylequeue.engine.images import resize_longest
from stylequeue.engine.device import (
    ExecutionPlan,
    apply_backend_settings,
    autocast,
    forward_of,
    plan_execution,
    resolve_device,
)
from stylequeue.engine.losses import ContentLoss, LossTerms, StyleLoss, StyleTransferLoss, gram_matrix
from stylequeue.engine.optim import (
    carry_optimizer_state,
    make_optimizer,
    optimizer_step,
    resize_image,
    to_cpu,
)
from stylequeue.engine.state import OptimState
from stylequeue.engine.targets import TargetCache, Targets, image_digest, style_side, style_target_key
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

# Settings that may differ between a checkpoint and the run resuming it: they do not change the result.
_RESUME_FREE = ("device", "precision", "compile", "progress_every", "checkpoint_every")


@dataclass
class Progress:
    """What the callback receives every ``progress_every`` iterations and at the end."""

    iteration: int  # global, counted over all scales
    total: int
    scale_index: int
    num_scales: int
    width: int
    height: int
    loss: float
    content_loss: float
    style_loss: float
    tv_loss: float
    elapsed_s: float
    its_per_s: float
    eta_s: float
    preview: Callable[[], Image.Image] = field(repr=False)


@dataclass
class StyleResult:
    """The output image and how it was made."""

    image: Image.Image
    config: StyleConfig
    history: list[dict[str, Any]]
    timings: dict[str, float]
    device: str
    precision: str
    stopped: bool
    state: OptimState | None
    weights_info: Any = None
    batch_size: int = 1  # how many jobs shared the forward pass (batch.stylize_batch)

    def metadata(self) -> dict[str, Any]:
        """JSON-able record: config, loss history, timings, device, weights and library versions."""
        info = self.weights_info
        if dataclasses.is_dataclass(info) and not isinstance(info, type):
            info = dataclasses.asdict(info)
        meta = {
            "config": self.config.to_dict(),
            "history": self.history,
            "timings": self.timings,
            "device": self.device,
            "precision": self.precision,
            "stopped": self.stopped,
            "batch_size": self.batch_size,
            "iterations_done": self.state.iteration if self.state else None,
            "width": self.image.width,
            "height": self.image.height,
            "weights": info,
            "random_weights": bool(info.get("random")) if isinstance(info, dict) else None,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "pillow": PIL.__version__,
            },
        }
        return meta


@dataclass
class _Job:
    """Everything fixed for the whole job."""

    config: StyleConfig
    model: VGGFeatures
    plan: ExecutionPlan
    content: Image.Image
    styles: list[Image.Image]
    blend: list[float]
    init_image: Image.Image | None
    sizes: list[int]
    started: float
    target_cache: TargetCache | None = None
    style_digests: list[str] | None = None  # image_digest of each style, when caching


@dataclass
class _Scale:
    """Everything fixed for one scale: targets and the content's colours."""

    index: int
    objective: StyleTransferLoss
    content: torch.Tensor  # (1, 3, H, W) pixels, luminance-only when original_colors
    content_color: torch.Tensor  # (1, 3, H, W) pixels, the real colours


@dataclass
class _Run:
    """What changes from step to step; what an OptimState records."""

    image: torch.Tensor  # leaf, in the optimised space
    optimizer: torch.optim.Optimizer
    ema: torch.Tensor | None
    iteration: int
    history: list[dict[str, Any]]
    last: LossTerms | None = None
    steps_this_session: int = 0


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
) -> StyleResult:
    """Stylise ``content`` with ``styles`` (PIL RGB images) under ``config``; see docs/architecture.md.

    ``target_cache`` keeps style targets (Gram matrices) for later jobs with the same style and
    settings (see targets.py); the result is the same with or without it.
    """
    job = _set_up(content, styles, config, model, init_image, target_cache)
    run: _Run | None = None
    scale: _Scale | None = None
    stopped = False
    first = resume.scale_index if resume is not None else 0
    for index in range(first, len(job.sizes)):
        scale = _prepare_scale(job, index)
        run = _start_scale(job, scale, run, resume if index == first else None)
        stopped = _run_scale(job, scale, run, callback, should_stop, on_checkpoint)
        if stopped:
            break
    assert run is not None and scale is not None
    return _finish(job, scale, run, stopped, callback)


def _set_up(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    model: VGGFeatures,
    init_image: Image.Image | None,
    target_cache: TargetCache | None = None,
) -> _Job:
    config.validate()
    if not styles:
        raise ConfigError("give at least one style image")
    blend = list(config.style_blend_weights or [1.0] * len(styles))
    if len(blend) != len(styles):
        raise ConfigError(
            f"{len(blend)} style blend weights for {len(styles)} style images; give one weight per style"
        )
    if config.init == "image" and init_image is None:
        raise ConfigError("init is 'image' but no initial image was given; pass one or choose init 'content'")
    if config.init != "image" and init_image is not None:
        raise ConfigError(f"an initial image was given but init is {config.init!r}; set init to 'image'")
    if model.pooling != config.pooling:
        raise ConfigError(
            f"the model was built with {model.pooling} pooling but the config asks for {config.pooling}; "
            "build VGGFeatures with pooling=config.pooling"
        )
    device = next(model.parameters()).device if config.device == "auto" else resolve_device(config.device)
    plan = plan_execution(device, config.precision, config.compile)
    apply_backend_settings(plan)
    model.to(device)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return _Job(
        config=config,
        model=model,
        plan=plan,
        content=content.convert("RGB"),
        styles=[s.convert("RGB") for s in styles],
        blend=[w / sum(blend) for w in blend],
        init_image=init_image.convert("RGB") if init_image is not None else None,
        sizes=scale_sizes(config.size, config.min_size, config.scales),
        started=time.perf_counter(),
        target_cache=target_cache,
        style_digests=[image_digest(s) for s in styles] if target_cache is not None else None,
    )


def scale_sizes(size: int, min_size: int, scales: int) -> list[int]:
    """Longest sides, coarse to fine, in a geometric progression ending at ``size``."""
    if scales == 1:
        return [size]
    ratio = size / min_size
    return [round(min_size * ratio ** (i / (scales - 1))) for i in range(scales)]


def _prepare_scale(job: _Job, index: int) -> _Scale:
    """Resize the inputs for this scale and compute its fixed targets once, under no_grad."""
    cfg, model, device = job.config, job.model, job.plan.device
    content_color = _to_tensor(resize_longest(job.content, job.sizes[index]), device)
    content = content_color
    content_luma = None
    if cfg.original_colors:
        content_luma = color.luminance(content_color)
        content = color.as_gray_rgb(content_luma)
    with torch.no_grad(), autocast(job.plan):
        content_feats = model(_memory_format(content, job.plan), cfg.content_layers)
    grams = [_style_targets(job, i, job.sizes[index], content_luma) for i in range(len(job.styles))]
    content_terms = {
        name: (ContentLoss(content_feats[name].float()), w)
        for name, w in layer_weights(cfg.content_layers, cfg.content_layer_weights).items()
    }
    style_terms = {
        name: (StyleLoss.from_grams([g[name] for g in grams], job.blend, cfg.gram_norm), w)
        for name, w in layer_weights(cfg.style_layers, cfg.style_layer_weights).items()
    }
    objective = StyleTransferLoss(
        content_terms,
        style_terms,
        content_weight=cfg.content_weight,
        style_weight=cfg.style_weight,
        tv_weight=cfg.tv_weight,
    )
    return _Scale(index=index, objective=objective, content=content, content_color=content_color)


def _style_targets(job: _Job, style: int, size: int, content_luma: torch.Tensor | None) -> Targets:
    """{layer: (1, C, C) Gram} of style ``style`` at output size ``size``, via the job's cache if any."""
    cfg, plan = job.config, job.plan
    key = None
    if job.target_cache is not None and job.style_digests is not None:
        stats = None
        if content_luma is not None:
            stats = (float(content_luma.mean().item()), float(content_luma.std().item()))
        key = style_target_key(job.style_digests[style], cfg, job.model.info, size,
                               precision=plan.precision, device_type=plan.device.type, luminance_stats=stats)
        cached = job.target_cache.get(key) if key is not None else None
        if cached is not None:
            return {name: cached[name].to(plan.device) for name in cfg.style_layers}
    # The style keeps its own aspect ratio; only its longest side follows the output's.
    pixels = _to_tensor(resize_longest(job.styles[style], style_side(cfg, size)), plan.device)
    if content_luma is not None:
        pixels = color.as_gray_rgb(color.match_luminance(color.luminance(pixels), content_luma))
    with torch.no_grad():
        with autocast(plan):
            features = job.model(_memory_format(pixels, plan), cfg.style_layers)
        # Outside autocast: Gram matrices are float32 (gram_matrix casts before its matmul).
        grams = {name: gram_matrix(features[name], cfg.gram_norm) for name in cfg.style_layers}
    if key is not None and job.target_cache is not None:
        job.target_cache.put(key, grams)
    return grams


def _start_scale(job: _Job, scale: _Scale, previous: _Run | None, resume: OptimState | None) -> _Run:
    """The image and optimiser at the start of a scale: fresh, carried up, or restored."""
    cfg, device = job.config, job.plan.device
    size = tuple(scale.content.shape[-2:])
    clamp = cfg.space == "pixel"
    if resume is not None:
        _check_resume(cfg, resume, size)
        # Copies throughout: the caller's OptimState must survive this run unchanged.
        image = resume.image.to(device, copy=True).requires_grad_(True)
        optimizer = make_optimizer(cfg, image)
        optimizer.load_state_dict(copy.deepcopy(resume.optimizer_state))
        ema = resume.ema_image.to(device, copy=True) if resume.ema_image is not None else None
        return _Run(image, optimizer, ema, resume.iteration, list(resume.history))
    if previous is None:
        image = _to_space(job, _initial_image(job, scale)).requires_grad_(True)
        ema = image.detach().clone() if cfg.ema_decay > 0 else None
        return _Run(image, make_optimizer(cfg, image), ema, 0, [])
    image = resize_image(previous.image.detach(), size, clamp=clamp).requires_grad_(True)
    optimizer = make_optimizer(cfg, image)
    carry_optimizer_state(previous.optimizer.state_dict(), optimizer, size)
    ema = resize_image(previous.ema, size, clamp=clamp) if previous.ema is not None else None
    return dataclasses.replace(previous, image=image, optimizer=optimizer, ema=ema)


def _check_resume(cfg: StyleConfig, resume: OptimState, size: tuple[int, ...]) -> None:
    mine = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}
    theirs = {k: v for k, v in resume.config.items() if k not in _RESUME_FREE}
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        raise ConfigError(
            f"cannot resume: the saved state was made with different settings {changed}; "
            "resume with the job's original settings or start again"
        )
    if tuple(resume.image.shape[-2:]) != size:
        raise ConfigError(
            f"cannot resume: the saved image is {tuple(resume.image.shape[-2:])} but this scale is {size}; "
            "resume with the same content image"
        )


def _initial_image(job: _Job, scale: _Scale) -> torch.Tensor:
    """(1, 3, H, W) pixels: the content, seeded noise, or the given image resized to the content."""
    cfg = job.config
    if cfg.init == "content":
        return scale.content.clone()
    if cfg.init == "noise":
        # Drawn on the CPU from its own generator: the same seed gives the same noise on any device.
        generator = torch.Generator().manual_seed(cfg.seed)
        image = (torch.rand(scale.content.shape, generator=generator) * 0.5 + 0.25).to(job.plan.device)
    else:
        assert job.init_image is not None
        h, w = scale.content.shape[-2:]
        image = _to_tensor(job.init_image.resize((w, h), Image.Resampling.LANCZOS), job.plan.device)
    # Luminance-only transfer optimises a grey image, whatever it starts from.
    return color.as_gray_rgb(color.luminance(image)) if cfg.original_colors else image


def _run_scale(
    job: _Job,
    scale: _Scale,
    run: _Run,
    callback: Callable[[Progress], None] | None,
    should_stop: Callable[[], bool] | None,
    on_checkpoint: Callable[[OptimState], None] | None,
) -> bool:
    """The inner loop for one scale; returns True when stopped early."""
    cfg = job.config
    end = (scale.index + 1) * cfg.iterations
    evaluate = _evaluator(job, scale)
    while run.iteration < end:
        if should_stop is not None and should_stop():
            return True
        run.last = optimizer_step(run.optimizer, run.image, evaluate, clamp=cfg.space == "pixel")
        _after_step(job, scale, run, callback, on_checkpoint)
    return False


def _after_step(
    job: _Job,
    scale: _Scale,
    run: _Run,
    callback: Callable[[Progress], None] | None,
    on_checkpoint: Callable[[OptimState], None] | None,
) -> None:
    """Count the step, average the iterate, report and checkpoint on their cadence (no sync else)."""
    cfg = job.config
    run.iteration += 1
    run.steps_this_session += 1
    if run.ema is not None:
        # Iterate averaging: the average of recent iterates is smoother than the last one.
        run.ema.mul_(cfg.ema_decay).add_(run.image.detach(), alpha=1 - cfg.ema_decay)
    if run.iteration % cfg.progress_every == 0 or run.iteration == cfg.total_iterations:
        _report(job, scale, run, callback)
    if on_checkpoint is not None and cfg.checkpoint_every and run.iteration % cfg.checkpoint_every == 0:
        on_checkpoint(_state(job, scale, run))


def _evaluator(job: _Job, scale: _Scale) -> Callable[[torch.Tensor], LossTerms]:
    """Loss of the current image: one VGG forward (cut at the deepest layer), then the losses."""
    model, plan, layers = job.model, job.plan, scale.objective.layers
    normalized = job.config.space == "normalized"
    forward = forward_of(model, plan)

    def evaluate(image: torch.Tensor) -> LossTerms:
        with autocast(plan):
            features = forward(_memory_format(image, plan), layers, normalized=normalized)
        pixels = model.denormalize(image) if normalized else image
        return scale.objective(features, pixels)

    return evaluate


def _report(job: _Job, scale: _Scale, run: _Run, callback: Callable[[Progress], None] | None) -> None:
    """Pull the losses to the host (the only sync), record history, call the callback."""
    if run.last is None or (run.history and run.history[-1]["iteration"] == run.iteration):
        return
    cfg = job.config
    elapsed = time.perf_counter() - job.started
    its = run.steps_this_session / elapsed if elapsed > 0 else 0.0
    losses = {k: float(getattr(run.last, k).sum().item()) for k in ("total", "content", "style", "tv")}
    run.history.append(
        {"iteration": run.iteration, "scale_index": scale.index, "loss": losses["total"],
         "content_loss": losses["content"], "style_loss": losses["style"], "tv_loss": losses["tv"],
         "elapsed_s": round(elapsed, 4)}
    )
    if callback is None:
        return
    snapshot = _output_tensor(job, run).detach().clone()
    height, width = snapshot.shape[-2:]
    remaining = cfg.total_iterations - run.iteration
    callback(
        Progress(
            iteration=run.iteration, total=cfg.total_iterations, scale_index=scale.index,
            num_scales=len(job.sizes), width=int(width), height=int(height), loss=losses["total"],
            content_loss=losses["content"], style_loss=losses["style"], tv_loss=losses["tv"],
            elapsed_s=elapsed, its_per_s=its, eta_s=remaining / its if its > 0 else math.inf,
            preview=lambda: _to_pil(_to_pixels(job, scale, snapshot)),
        )
    )


def _finish(
    job: _Job, scale: _Scale, run: _Run, stopped: bool, callback: Callable[[Progress], None] | None
) -> StyleResult:
    _report(job, scale, run, callback)
    optimize_s = time.perf_counter() - job.started
    image = _to_pil(_to_pixels(job, scale, _output_tensor(job, run).detach()))
    return StyleResult(
        image=image,
        config=job.config,
        history=run.history,
        timings={"total_s": round(optimize_s, 4), "iterations": run.steps_this_session,
                 "s_per_iteration": round(optimize_s / max(run.steps_this_session, 1), 6)},
        device=str(job.plan.device),
        precision=job.plan.precision,
        stopped=stopped,
        state=_state(job, scale, run),
        weights_info=job.model.info,
    )


def _state(job: _Job, scale: _Scale, run: _Run) -> OptimState:
    return OptimState(
        image=to_cpu(run.image),
        optimizer_state=to_cpu(run.optimizer.state_dict()),
        iteration=run.iteration,
        scale_index=scale.index,
        config=job.config.to_dict(),
        ema_image=to_cpu(run.ema) if run.ema is not None else None,
        history=[dict(h) for h in run.history],
    )


def _output_tensor(job: _Job, run: _Run) -> torch.Tensor:
    return run.ema if run.ema is not None else run.image


def _to_space(job: _Job, pixels: torch.Tensor) -> torch.Tensor:
    return job.model.normalize(pixels) if job.config.space == "normalized" else pixels


def _to_pixels(job: _Job, scale: _Scale, image: torch.Tensor) -> torch.Tensor:
    """Optimised tensor -> (1, 3, H, W) RGB in [0, 1], with the content's colours if asked."""
    pixels = job.model.denormalize(image) if job.config.space == "normalized" else image
    pixels = pixels.float().clamp(0, 1)
    if job.config.original_colors:
        pixels = color.combine_luminance(pixels, scale.content_color)
    return pixels


def _memory_format(x: torch.Tensor, plan: ExecutionPlan) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if plan.channels_last else x


def _to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL RGB (rounded, not truncated)."""
    array = image[0].detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")
