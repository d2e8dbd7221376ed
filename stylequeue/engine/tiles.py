"""Overlapping tiles for pictures larger than one GPU holds: plan, cut, weigh, blend, measure seams.

A print-size job's final size runs as overlapping tiles, each stylized on its own, then blended:
each tile weighted by a window that is 1 inside and falls across the overlaps with its neighbours,
the sum divided by the summed weights. Boxes are output pixels, right/bottom exclusive (as PIL's
``crop``); a grid is one axis's spans crossed with the other's, tiles numbered row-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
from PIL import Image

from stylequeue.exceptions import ConfigError

Spans = tuple[tuple[int, int], ...]  # one axis: (start, end) per tile, end exclusive


@dataclass(frozen=True)
class Tile:
    """One tile's box in output pixels; ``index`` is its place in ``TilePlan.tiles`` (row-major)."""

    index: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom): what ``PIL.Image.crop`` takes."""
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class TilePlan:
    """A grid of overlapping tiles over a ``width`` x ``height`` picture.

    The spans are stored, not re-planned from ``tile`` and ``overlap``: the plan travels in task
    messages, and the worker that blends must use the very boxes the planner cut, even if a newer
    release would plan differently.
    """

    width: int
    height: int
    tile: int
    overlap: int
    columns: Spans
    rows: Spans
    shifted: bool = False

    def __post_init__(self) -> None:
        _check_spans(self.columns, self.width, self.tile, "columns")
        _check_spans(self.rows, self.height, self.tile, "rows")

    @cached_property
    def tiles(self) -> tuple[Tile, ...]:
        return tuple(
            Tile(r * len(self.columns) + c, x0, y0, x1, y1)
            for r, (y0, y1) in enumerate(self.rows)
            for c, (x0, x1) in enumerate(self.columns)
        )

    @property
    def seams(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(x, y) pixel edges where one tile's window hands over to the next: each overlap's middle."""
        return _seams(self.columns), _seams(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Small JSON for a task message: sizes, the two axes' spans, and whether it is shifted."""
        return {"width": self.width, "height": self.height, "tile": self.tile, "overlap": self.overlap,
                "columns": [list(s) for s in self.columns], "rows": [list(s) for s in self.rows],
                "shifted": self.shifted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilePlan:
        """The plan ``to_dict`` wrote; its spans are checked again (a message is not trusted)."""
        try:
            sizes = [int(data[key]) for key in ("width", "height", "tile", "overlap")]
            columns = tuple((int(a), int(b)) for a, b in data["columns"])
            rows = tuple((int(a), int(b)) for a, b in data["rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a tile plan ({exc!r}): expected what TilePlan.to_dict writes") from exc
        return cls(*sizes, columns, rows, bool(data.get("shifted", False)))


def plan_tiles(width: int, height: int, tile: int, overlap: int) -> TilePlan:
    """The fewest tiles of at most ``tile`` px a side covering the picture, neighbours sharing ``overlap`` px.

    On each axis the tiles' lengths differ by at most one pixel: the slack is spread over all of
    them rather than left to a thin last tile, which would see too little of the picture for its
    style to match its neighbours'. A picture no larger than ``tile`` is a single tile. With a
    tile under 3 x ``overlap`` some pixels can fall in three tiles; ``blend`` normalises, so that
    costs only GPU time.
    """
    sizes = {"width": width, "height": height, "tile": tile, "overlap": overlap}
    for name, value in sizes.items():
        least = 0 if name == "overlap" else 1
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"tile plan: {name} must be a whole number of pixels, {least} or more, got {value!r}")
    if 2 * overlap >= tile:
        raise ConfigError(
            f"tile plan: a tile of {tile} px cannot hold an overlap of {overlap} px on both sides; "
            f"make the tile larger than {2 * overlap} px or the overlap smaller than {math.ceil(tile / 2)} px"
        )
    return TilePlan(width, height, tile, overlap,
                    _axis_spans(width, tile, overlap), _axis_spans(height, tile, overlap))


def shifted(plan: TilePlan) -> TilePlan:
    """A second grid whose seams run through the middles of ``plan``'s tiles (half a tile along).

    Blending a second pass on this grid puts its seams where the first pass had none; its edge
    tiles are about half as wide. An axis with a single tile stays as it is (it has no seam).
    """
    return TilePlan(plan.width, plan.height, plan.tile, plan.overlap,
                    _half_shift(plan.columns, plan.overlap, plan.width),
                    _half_shift(plan.rows, plan.overlap, plan.height), shifted=True)


def window(tile: Tile, plan: TilePlan, *, dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None) -> torch.Tensor:
    """``tile``'s blending weight, (1, 1, h, w): 1 inside, a raised-cosine fall across each shared overlap.

    Where the tile meets the picture's edge the weight stays 1: no other tile covers those pixels,
    so a fall there would blend with nothing and only drive the summed weight towards 0.
    Every pixel of the tile gets a positive weight (ramps are sampled at pixel centres), so the
    windows of a plan sum to more than 0 everywhere.
    """
    if tile.index >= len(plan.tiles) or plan.tiles[tile.index] != tile:
        raise ValueError(f"{tile} is not tile {tile.index} of this plan")
    row, column = divmod(tile.index, len(plan.columns))
    weights = _axis_window(plan.rows, row)[:, None] * _axis_window(plan.columns, column)[None, :]
    return weights.to(dtype=dtype, device=device)[None, None]


def blend(tiles: Sequence[tuple[Tile, torch.Tensor]], plan: TilePlan) -> torch.Tensor:
    """Every tile of ``plan`` with its image (1, C, h, w), blended into one (1, C, H, W) picture.

    The weighted average with ``window``'s weights; dividing by their sum makes crops of one image
    blend back into that image exactly, wherever three tiles share a pixel or ramps are uneven.
    """
    given, count = sorted(t.index for t, _ in tiles), len(plan.tiles)
    if given != list(range(count)):
        missing = sorted(set(range(count)) - set(given))
        raise ValueError(f"blend needs each of the plan's {count} tiles once: has {given}, lacks {missing}")
    first = tiles[0][1]
    dtype = torch.promote_types(first.dtype, torch.float32)
    total = torch.zeros(1, first.shape[1], plan.height, plan.width, dtype=dtype, device=first.device)
    weight = torch.zeros(1, 1, plan.height, plan.width, dtype=dtype, device=first.device)
    for tile, image in tiles:
        if tuple(image.shape) != (1, first.shape[1], tile.height, tile.width):
            raise ValueError(f"tile {tile.index}'s image is {tuple(image.shape)}, "
                             f"expected (1, {first.shape[1]}, {tile.height}, {tile.width})")
        w = window(tile, plan, dtype=dtype, device=first.device)
        total[..., tile.y0:tile.y1, tile.x0:tile.x1] += w * image.to(dtype)
        weight[..., tile.y0:tile.y1, tile.x0:tile.x1] += w
    return (total / weight).to(first.dtype)


def crop(image: torch.Tensor, tile: Tile) -> torch.Tensor:
    """``tile``'s pixels of a (B, C, H, W) tensor: a view, (B, C, h, w)."""
    _check_inside(tile, image.shape[-1], image.shape[-2])
    return image[..., tile.y0:tile.y1, tile.x0:tile.x1]


def crop_pil(image: Image.Image, tile: Tile) -> Image.Image:
    """``tile``'s pixels of a PIL image (PIL would pad a box past the edge with black; refused here)."""
    _check_inside(tile, image.width, image.height)
    return image.crop(tile.box)


def seam_energy(image: torch.Tensor, plan: TilePlan, *, half_band: int = 1) -> dict[str, float]:
    """How much a blended (1, C, H, W) picture changes across its seams, against everywhere else.

    The squared gradient magnitude (forward differences, summed over channels) averaged over
    bands ``2 * half_band + 1`` px wide centred on ``plan.seams``, and over the rest of the picture.
    ``ratio`` near 1: no visible seam; a step in brightness between pasted tiles gives well above 1.
    """
    xs, ys = plan.seams
    if not xs and not ys:
        raise ValueError("seam_energy: the plan is a single tile, so the picture has no seam to measure")
    if tuple(image.shape[-2:]) != (plan.height, plan.width):
        raise ValueError(f"seam_energy: the image is {tuple(image.shape)}, the plan {plan.width} x {plan.height}")
    img = image.detach().to("cpu", torch.float64)
    gx = img[..., :-1, 1:] - img[..., :-1, :-1]  # (B, C, H-1, W-1); column x sits on edge x + 1
    gy = img[..., 1:, :-1] - img[..., :-1, :-1]  # row y sits on edge y + 1
    energy = (gx.square() + gy.square()).sum(dim=1).mean(dim=0)  # (H-1, W-1)
    band = _near(ys, plan.height, half_band)[:, None] | _near(xs, plan.width, half_band)[None, :]
    border, elsewhere = energy[band].mean().item(), energy[~band].mean().item()
    ratio = border / elsewhere if elsewhere > 0 else (math.inf if border > 0 else 1.0)
    return {"border": border, "elsewhere": elsewhere, "ratio": ratio}


def _axis_spans(length: int, tile: int, overlap: int) -> Spans:
    if length <= tile:
        return ((0, length),)
    # The fewest spans that reach: count * tile - (count - 1) * overlap >= length.
    count = -(-(length - overlap) // (tile - overlap))
    base, extra = divmod(length + (count - 1) * overlap, count)  # overlaps are counted in both tiles
    spans, start = [], 0
    for k in range(count):
        end = start + base + (k < extra)
        spans.append((start, end))
        start = end - overlap
    return tuple(spans)


def _half_shift(spans: Spans, overlap: int, length: int) -> Spans:
    if len(spans) == 1:
        return spans
    before, after = overlap // 2, overlap - overlap // 2
    # Each tile's middle becomes a seam, kept far enough in that the edge tiles keep a pixel of their own.
    cuts = [min(max((a + b) // 2, before + 1), length - after - 1) for a, b in spans]
    return tuple(zip([0] + [c - before for c in cuts], [c + after for c in cuts] + [length]))


def _seams(spans: Spans) -> tuple[int, ...]:
    return tuple((start + previous_end) // 2 for (_, previous_end), (start, _) in zip(spans, spans[1:]))


def _near(seams: tuple[int, ...], length: int, half_band: int) -> torch.Tensor:
    """Which of the ``length - 1`` pixel edges 1..length-1 lie within ``half_band`` of a seam."""
    edges = torch.arange(1, length)
    return torch.stack([(edges - s).abs() <= half_band for s in seams]).any(dim=0) if seams else edges < 0


def _ramp(length: int) -> torch.Tensor:
    """sin^2 rising over ``length`` px, at pixel centres: the rising half of a Hann window.

    The neighbour's falling ramp over the same pixels is cos^2 of the same angle: they sum to 1.
    Its slope is 0 at both ends, so the weight meets the flat interior without a kink (a step in
    the gradient, which the eye reads as a faint line of its own; a linear ramp has one each end).
    """
    return torch.sin(torch.pi / 2 * (torch.arange(length, dtype=torch.float64) + 0.5) / length).square()


def _axis_window(spans: Spans, k: int) -> torch.Tensor:
    start, end = spans[k]
    weights = torch.ones(end - start, dtype=torch.float64)
    if k > 0:  # shared with the previous tile: [start, its end)
        shared = spans[k - 1][1] - start
        weights[:shared] *= _ramp(shared)
    if k + 1 < len(spans):  # shared with the next tile: [its start, end)
        shared = end - spans[k + 1][0]
        weights[end - start - shared:] *= _ramp(shared).flip(0)
    return weights


def _check_spans(spans: Spans, length: int, tile: int, name: str) -> None:
    problem = None
    if not spans or spans[0][0] != 0 or spans[-1][1] != length:
        problem = f"they must run from 0 to {length}"
    elif any(b - a < 1 or b - a > tile for a, b in spans):
        problem = f"each must be 1 to {tile} px long"
    elif any(a1 <= a0 or b1 <= b0 or a1 > b0 for (a0, b0), (a1, b1) in zip(spans, spans[1:])):
        problem = "each must start and end after the one before, leaving no gap"
    if problem:
        raise ConfigError(f"tile plan {name} {[list(s) for s in spans]}: {problem}")


def _check_inside(tile: Tile, width: int, height: int) -> None:
    if tile.x0 < 0 or tile.y0 < 0 or tile.x1 > width or tile.y1 > height:
        raise ValueError(f"{tile} reaches outside the {width} x {height} picture: planned for another size?")
