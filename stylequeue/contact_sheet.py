"""A contact sheet: the results of a batch side by side in one grid image."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
LABEL_COLOUR = (0, 0, 0)
LABEL_HEIGHT = 12  # pixels under each tile for its caption (Pillow's default bitmap font)


@dataclass(frozen=True)
class SheetLayout:
    """Grid geometry; every tile is ``tile`` pixels square plus a caption strip."""

    columns: int
    rows: int
    tile: int
    padding: int
    label_height: int

    @property
    def size(self) -> tuple[int, int]:
        cell_w = self.tile + self.padding
        cell_h = self.tile + self.label_height + self.padding
        return self.columns * cell_w + self.padding, self.rows * cell_h + self.padding


def plan_layout(count: int, *, tile: int, padding: int = 4, columns: int | None = None,
                labels: bool = True) -> SheetLayout:
    """A near-square grid for ``count`` tiles (``columns`` fixes the width)."""
    if count <= 0:
        raise ValueError("a contact sheet needs at least one image")
    cols = columns or math.ceil(math.sqrt(count))
    cols = max(1, min(cols, count))
    return SheetLayout(cols, math.ceil(count / cols), tile, padding, LABEL_HEIGHT if labels else 0)


def make_contact_sheet(
    images: list[Image.Image],
    *,
    tile: int = 128,
    labels: list[str] | None = None,
    columns: int | None = None,
    padding: int = 4,
) -> Image.Image:
    """Fit each image into a ``tile``-pixel square (aspect kept, centred) and grid them.

    Tiles are never enlarged: a 32 px result stays 32 px in a bigger white tile.
    """
    layout = plan_layout(len(images), tile=tile, padding=padding, columns=columns,
                         labels=labels is not None)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        row, col = divmod(index, layout.columns)
        left = layout.padding + col * (layout.tile + layout.padding)
        top = layout.padding + row * (layout.tile + layout.label_height + layout.padding)
        thumb = image.convert("RGB")
        thumb.thumbnail((layout.tile, layout.tile), Image.Resampling.LANCZOS)
        offset = ((layout.tile - thumb.width) // 2, (layout.tile - thumb.height) // 2)
        sheet.paste(thumb, (left + offset[0], top + offset[1]))
        if labels is not None and index < len(labels):
            draw.text((left, top + layout.tile), labels[index][: layout.tile // 6], fill=LABEL_COLOUR)
    return sheet
