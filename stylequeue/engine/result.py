"""What the engine hands back: a :class:`Progress` to the callback while it runs, a
:class:`StyleResult` when it ends. The callback is the engine's only channel out: the service
turns a Progress into a Celery state and an event, the CLI into a progress bar.
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import PIL
import torch
import torchvision
from PIL import Image

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.state import OptimState


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
    tile: int | None = None  # a tiled job's final scale: which tile (engine/tiled.py) ...
    tiles: int = 0  # ... of how many


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
    batch_size: int = 1  # how many jobs shared the forward pass (transfer.stylize_batch)

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
