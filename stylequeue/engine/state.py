"""OptimState: everything needed to resume an interrupted job exactly where it stopped.

Like a nanoGPT checkpoint, it is a plain dict of tensors and numbers that carries the config
that made it; the service stores its bytes in object storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from stylequeue.exceptions import ConfigError

FORMAT_VERSION = 1


@dataclass
class OptimState:
    """Image being optimised (CPU, (1, 3, H, W), in the optimised space), optimiser state,
    global iteration, scale index, EMA image and the config dict."""

    image: torch.Tensor
    optimizer_state: dict[str, Any]
    iteration: int
    scale_index: int
    config: dict[str, Any]
    ema_image: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "format_version": FORMAT_VERSION,
                "image": self.image,
                "optimizer_state": self.optimizer_state,
                "iteration": self.iteration,
                "scale_index": self.scale_index,
                "config": self.config,
                "ema_image": self.ema_image,
                "history": self.history,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "OptimState":
        """Load with weights_only=True: a checkpoint from storage must not run code."""
        try:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or foreign files
            raise ConfigError(
                f"the saved optimisation state cannot be read ({exc}); start the job again without resume"
            ) from exc
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            raise ConfigError("the saved optimisation state has an unknown format; start the job again")
        return cls(
            image=raw["image"],
            optimizer_state=raw["optimizer_state"],
            iteration=int(raw["iteration"]),
            scale_index=int(raw["scale_index"]),
            config=raw["config"],
            ema_image=raw["ema_image"],
            history=list(raw["history"]),
        )
