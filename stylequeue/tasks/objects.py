"""A job's objects in storage, as the engine's types: input images, checkpoints, the images the
service wrote itself. The state a chain step hands the next travels through storage
(``checkpoint.pt``), never through the broker.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image

from stylequeue.engine import OptimState
from stylequeue.engine.images import load_image
from stylequeue.settings import Settings


def read_image(store: Any, uri: str, settings: Settings) -> Image.Image:
    """Fetch and decode ``uri`` as RGB, within the deployment's pixel limit."""
    return read_input(store, uri, settings)[0]


def read_input(store: Any, uri: str, settings: Settings) -> tuple[Image.Image, str]:
    """(image, sha256 of its bytes): an input and what identifies its content."""
    data = store.get_bytes(uri)
    return load_image(data, name=uri, max_pixels=settings.max_pixels), hashlib.sha256(data).hexdigest()


def checkpoint_owner(spec_digest: str, input_digests: list[str]) -> str:
    """Whose checkpoint: this spec on these input bytes. A resubmitted id with other content (or a
    content object overwritten in place) never resumes the old run's state."""
    return hashlib.sha256(f"{spec_digest}:{','.join(input_digests)}".encode()).hexdigest()


def to_json(data: Any, indent: int | None = None) -> bytes:
    """Strict JSON (no bare NaN or Infinity, which other parsers refuse), UTF-8."""
    return json.dumps(data, indent=indent, allow_nan=False).encode()


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
