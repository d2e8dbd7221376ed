"""A job's objects in storage, as the engine's types: input images, checkpoints, the images the
service wrote itself. The state a chain step hands the next travels through storage
(``checkpoint.pt``), never through the broker.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from stylequeue.engine import OptimState
from stylequeue.engine.images import load_image
from stylequeue.settings import Settings


def read_image(store: Any, uri: str, settings: Settings) -> Image.Image:
    """Fetch and decode ``uri`` as RGB, within the deployment's pixel limit."""
    return load_image(store.get_bytes(uri), name=uri, max_pixels=settings.max_pixels)


def read_state(store: Any, uri: str) -> OptimState | None:
    """The checkpoint at ``uri``, or None when there is none."""
    if not store.exists(uri):
        return None
    return OptimState.from_bytes(store.get_bytes(uri))


def write_state(store: Any, uri: str, state: OptimState) -> None:
    store.put_bytes(uri, state.to_bytes(), content_type="application/octet-stream")


def decode_own_image(data: bytes) -> Image.Image:
    """Decode an image this service wrote itself (previews, results): no limits needed."""
    return Image.open(io.BytesIO(data)).convert("RGB")
