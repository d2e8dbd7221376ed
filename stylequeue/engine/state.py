"""OptimState: everything needed to resume an interrupted job exactly where it stopped.

Like a nanoGPT checkpoint, it is a plain dict of tensors and numbers that carries the config
that made it; the service stores its bytes in object storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from stylequeue.engine.config import RESUME_FREE, StyleConfig, differences
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
    # Whose state this is, as the caller names it (the service: a digest of the job's spec and
    # its inputs' bytes); a caller never resumes a state that names another owner.
    owner: str | None = None

    def changed_settings(self, config: StyleConfig) -> list[str]:
        """Settings in which ``config`` differs from the run that saved this state (RESUME_FREE
        aside): resuming under any of them would continue another optimisation."""
        return differences(config.to_dict(), self.config, RESUME_FREE)

    def matches(self, config: StyleConfig) -> bool:
        """Did this state come from a run of ``config`` (cadence and device aside)?"""
        return not self.changed_settings(config)

    def check_resumes(self, config: StyleConfig, size: tuple[int, ...] | None = None) -> None:
        """ConfigError unless a run of ``config`` (at an (H, W) image of ``size``) can continue this."""
        changed = self.changed_settings(config)
        if changed:
            raise ConfigError(
                f"cannot resume: the saved state was made with different settings {changed}; "
                "resume with the job's original settings or start again"
            )
        if size is not None and tuple(self.image.shape[-2:]) != tuple(size):
            raise ConfigError(
                f"cannot resume: the saved image is {tuple(self.image.shape[-2:])} but this scale is "
                f"{tuple(size)}; resume with the same content image"
            )

    def scale_finished(self, iterations: int) -> bool:
        """Has its scale run all ``iterations`` steps (iterations count over all scales)?"""
        return self.iteration >= (self.scale_index + 1) * iterations

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
                "owner": self.owner,
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
            owner=raw.get("owner"),
        )
