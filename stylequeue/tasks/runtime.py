"""What a worker process keeps between tasks, and the storage/engine glue the tasks share.

* one storage client and one VGG19 model per process (a model costs seconds and hundreds of MB:
  it is built on the first job and reused, keyed by weights source, pooling and device);
* reading images and checkpoints by URI;
* the multi-scale chain: step ``k`` of a job runs the engine for ONE scale. Its starting point
  is the previous step's final :class:`OptimState` (image and Adam moments) carried up to the
  new size, or this step's own checkpoint when the message was redelivered. The state travels
  through storage (``checkpoint.pt``), never through the broker.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from PIL import Image

from stylequeue.engine import OptimState, StyleConfig, VGGFeatures, scale_sizes
from stylequeue.engine.device import resolve_device
from stylequeue.engine.images import encode_image, fit_longest, load_image, resize_longest
from stylequeue.engine.optim import carry_optimizer_state, make_optimizer, resize_image
from stylequeue.engine.vgg import LAYER_INDEX, check_input_size
from stylequeue.engine.weights import load_weights
from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings
from stylequeue.storage import install_weights_fetchers, open_storage

log = logging.getLogger(__name__)

_lock = threading.Lock()
_storages: dict[int, Any] = {}
_models: dict[tuple[str, str, str, str], VGGFeatures] = {}


def storage_for(settings: Settings) -> Any:
    """This process's storage client for ``settings`` (boto3 clients are reusable)."""
    with _lock:
        store = _storages.get(id(settings))
        if store is None:
            store = _storages[id(settings)] = open_storage(settings)
        return store


def model_for(settings: Settings, pooling: str, weights: str | None = None) -> VGGFeatures:
    """The VGG19 feature model for this process, built once per (weights, pooling, device).

    ``weights`` is a job's own source; None means the deployment's (``settings.weights``, whose
    checksum ``weights_sha256`` is then enforced). Called in the task, so CUDA is first touched
    in the pool child after the fork, never in the worker's parent process.
    """
    source = weights or settings.weights
    sha256 = settings.weights_sha256 if source == settings.weights else ""
    device = resolve_device(settings.device)
    key = (source, sha256, pooling, str(device))
    with _lock:
        model = _models.get(key)
        if model is None:
            log.info("loading VGG19 weights %s (%s pooling) on %s", source, pooling, device)
            if source.startswith("s3://"):
                # Pulled once through storage (endpoint, credentials, retries), then cached on disk.
                # The fetcher allows the deployment's own weights URI; a job's URI must lie under
                # the allowed prefixes like any other input (JobSpec checks it too: belt and braces).
                install_weights_fetchers(settings).check(source)
            loaded = load_weights(source, sha256=sha256 or None, cache_dir=settings.resolved_weights_cache_dir)
            model = _models[key] = VGGFeatures.from_weights(loaded, pooling=pooling, device=device)
        return model


def read_image(store: Any, uri: str, settings: Settings) -> Image.Image:
    """Fetch and decode ``uri`` as RGB, within the deployment's pixel limit."""
    return load_image(store.get_bytes(uri), name=uri, max_pixels=settings.max_pixels)


def image_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    return encode_image(image, fmt)


def read_state(store: Any, uri: str) -> OptimState | None:
    """The checkpoint at ``uri``, or None when there is none."""
    if not store.exists(uri):
        return None
    return OptimState.from_bytes(store.get_bytes(uri))


def write_state(store: Any, uri: str, state: OptimState) -> None:
    store.put_bytes(uri, state.to_bytes(), content_type="application/octet-stream")


def step_sizes(config: StyleConfig) -> list[int]:
    """Longest side of each chain step, coarse to fine (one entry for a single-scale job)."""
    return scale_sizes(config.size, config.min_size, config.scales)


def check_step_sizes(uri: str, content_size: tuple[int, int], config: StyleConfig) -> None:
    """ConfigError naming ``uri`` when a step's image would be too small for VGG's deepest layer
    (an extreme aspect ratio: 2000x4 at 32 px is 32x1), found at validation, before a GPU is taken."""
    layers = [*config.content_layers, *config.style_layers]
    deepest = max(layers, key=LAYER_INDEX.__getitem__)
    for size in step_sizes(config):
        width, height = fit_longest(content_size, size)
        try:
            check_input_size((height, width), deepest)
        except ConfigError as exc:
            raise ConfigError(f"{uri}: {exc}") from None


def step_config(config: StyleConfig, step: int, settings: Settings, checkpoint_every: int) -> StyleConfig:
    """The single-scale config step ``step`` runs; progress cadence and device are the deployment's."""
    return config.replace(
        size=step_sizes(config)[step],
        scales=1,
        progress_every=settings.progress_every,
        checkpoint_every=checkpoint_every,
        device=settings.device,
    )


def _same_run(state: OptimState, config: StyleConfig) -> bool:
    """Did ``state`` come from a run of exactly ``config`` (cadence and device aside)?"""
    free = ("device", "precision", "compile", "progress_every", "checkpoint_every")
    mine = {k: v for k, v in config.to_dict().items() if k not in free}
    theirs = {k: v for k, v in state.config.items() if k not in free}
    return mine == theirs


def carry_up(previous: OptimState, config: StyleConfig, content: Image.Image) -> OptimState:
    """The previous scale's final state resized to this step's size, as a fresh step-0 state.

    The image is resized bicubically and Adam's moments carried by the engine's own helper, so a
    chain of single-scale steps continues the optimisation the way one multi-scale run would.
    Iterations restart at 0 because each step is a single-scale run of the engine.
    """
    width, height = resize_longest(content, config.size).size
    clamp = config.space == "pixel"
    image = resize_image(previous.image, (height, width), clamp=clamp).requires_grad_(True)
    optimizer = make_optimizer(config, image)
    carry_optimizer_state(previous.optimizer_state, optimizer, (height, width))
    ema = resize_image(previous.ema_image, (height, width), clamp=clamp) if previous.ema_image is not None else None
    return OptimState(
        image=image.detach(),
        optimizer_state=optimizer.state_dict(),
        iteration=0,
        scale_index=0,
        config=config.to_dict(),
        ema_image=ema,
        history=[],
    )


def starting_state(
    saved: OptimState | None, config: StyleConfig, step: int, content: Image.Image
) -> tuple[OptimState | None, str]:
    """Where step ``step`` starts, and how: ``fresh``, ``resumed`` or ``carried``.

    ``saved`` is the job's checkpoint: this step's own (a redelivery: resume from it), or the
    previous step's final state (carry it up), or nothing (the first step of a new job).
    """
    if saved is not None and _same_run(saved, config):
        return saved, "resumed"
    if step == 0:
        return None, "fresh"
    if saved is None:
        raise RuntimeError(
            f"step {step} found no checkpoint from step {step - 1}; the chain's state was lost, "
            "resubmit the job"
        )
    return carry_up(saved, config, content), "carried"


def decode_preview(data: bytes) -> Image.Image:
    """Decode an image this service wrote itself (previews, results): no limits needed."""
    return Image.open(io.BytesIO(data)).convert("RGB")
