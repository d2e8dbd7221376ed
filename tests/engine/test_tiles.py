"""Tiling primitives: plans, windows, blending and the seam metric, on tiny CPU tensors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import ImageFilter

from stylequeue.engine.tensors import to_tensor
from stylequeue.engine.tiles import (
    Tile,
    TilePlan,
    blend,
    crop,
    crop_pil,
    plan_tiles,
    seam_energy,
    shifted,
    window,
)
from stylequeue.exceptions import ConfigError
from tests.conftest import make_image

CPU = torch.device("cpu")
# (width, height, tile, overlap): the usual case, odd sizes, one axis a single tile, and a tile
# under 3 x overlap, where some pixels lie in three tiles.
GEOMETRIES = [(48, 32, 24, 8), (53, 41, 16, 5), (100, 7, 30, 10), (48, 32, 17, 8)]


def _plans(width: int, height: int, tile: int, overlap: int) -> list[TilePlan]:
    plan = plan_tiles(width, height, tile, overlap)
    return [plan, shifted(plan)]


def _coverage(plan: TilePlan) -> torch.Tensor:
    count = torch.zeros(plan.height, plan.width)
    for t in plan.tiles:
        count[t.y0:t.y1, t.x0:t.x1] += 1
    return count


def _weight_sum(plan: TilePlan) -> torch.Tensor:
    total = torch.zeros(1, 1, plan.height, plan.width, dtype=torch.float64)
    for t in plan.tiles:
        total[..., t.y0:t.y1, t.x0:t.x1] += window(t, plan, dtype=torch.float64)
    return total


def _paste(tiles: list[tuple[Tile, torch.Tensor]], plan: TilePlan) -> torch.Tensor:
    """Tiles put side by side without blending, cut at the seams: the hard-seam baseline."""
    (xs, ys), columns = plan.seams, len(plan.columns)
    ex, ey = [0, *xs, plan.width], [0, *ys, plan.height]
    out = torch.zeros(1, 3, plan.height, plan.width)
    for t, image in tiles:
        r, c = divmod(t.index, columns)
        (top, bottom), (left, right) = (ey[r], ey[r + 1]), (ex[c], ex[c + 1])
        out[..., top:bottom, left:right] = image[..., top - t.y0:bottom - t.y0, left - t.x0:right - t.x0]
    return out


def _brightened(image: torch.Tensor, plan: TilePlan, delta: float) -> list[tuple[Tile, torch.Tensor]]:
    """Each tile's crop brightened or darkened by ``delta``, neighbours opposite: a step of 2 * delta."""
    columns = len(plan.columns)
    signs = [1 if sum(divmod(t.index, columns)) % 2 else -1 for t in plan.tiles]
    return [(t, crop(image, t) + sign * delta) for t, sign in zip(plan.tiles, signs)]


# -- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_plans_cover_every_pixel_within_tile_size_and_overlap(geometry: tuple[int, int, int, int]) -> None:
    width, height, tile, overlap = geometry
    for plan in _plans(*geometry):
        assert _coverage(plan).min() >= 1
        assert all(0 < t.width <= tile and 0 < t.height <= tile for t in plan.tiles)
        for spans in (plan.columns, plan.rows):
            assert all(end - start >= overlap for (_, end), (start, _) in zip(spans, spans[1:]))
        assert [t.index for t in plan.tiles] == list(range(len(plan.columns) * len(plan.rows)))
    first = plan_tiles(*geometry)
    for spans in (first.columns, first.rows):
        lengths = [end - start for start, end in spans]
        assert max(lengths) - min(lengths) <= 1  # nearly equal: no thin last tile


def test_slack_is_spread_over_all_tiles_rather_than_a_thin_last_one() -> None:
    # 101 px in 40 px tiles sharing 10: four tiles of 33/32 px, not 40, 40, 40 and a sliver.
    plan = plan_tiles(101, 10, 40, 10)
    assert plan.columns == ((0, 33), (23, 56), (46, 79), (69, 101))
    assert plan.rows == ((0, 10),)


def test_a_picture_within_one_tile_is_a_single_tile() -> None:
    plan = plan_tiles(48, 32, 64, 8)
    assert plan.tiles == (Tile(0, 0, 0, 48, 32),)
    assert plan.seams == ((), ())
    assert torch.equal(window(plan.tiles[0], plan), torch.ones(1, 1, 32, 48))
    assert shifted(plan).tiles == plan.tiles
    wide = plan_tiles(48, 32, 40, 8)  # too wide for one tile, low enough for one row
    assert (len(wide.columns), len(wide.rows)) == (2, 1)


def test_the_shifted_grid_puts_its_seams_in_the_middles_of_the_first_grids_tiles() -> None:
    plan = plan_tiles(48, 32, 24, 8)
    second = shifted(plan)
    assert second.shifted and not plan.shifted
    assert second.seams[0] == tuple((a + b) // 2 for a, b in plan.columns)
    assert second.seams[1] == tuple((a + b) // 2 for a, b in plan.rows)
    nearest = min(abs(a - b) for a in second.seams[0] for b in plan.seams[0])
    assert nearest >= 4


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((48, 32, 16, 8), "cannot hold an overlap of 8 px on both sides"),
        ((48, 32, 16, 9), "make the tile larger than 18 px"),
        ((0, 32, 24, 8), "width must be a whole number of pixels, 1 or more"),
        ((48, 32.5, 24, 8), "height must be a whole number"),
        ((48, 32, 0, 0), "tile must be a whole number"),
        ((48, 32, 24, -1), "overlap must be a whole number of pixels, 0 or more"),
    ],
)
def test_bad_plan_arguments_are_refused_in_words(args: tuple, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        plan_tiles(*args)


def test_a_plan_survives_a_json_round_trip_and_a_tampered_one_is_refused() -> None:
    for plan in _plans(53, 41, 16, 5):
        data = json.loads(json.dumps(plan.to_dict()))
        again = TilePlan.from_dict(data)
        assert again == plan and again.tiles == plan.tiles
    data = plan_tiles(48, 32, 24, 8).to_dict()
    with pytest.raises(ConfigError, match="leaving no gap"):
        TilePlan.from_dict({**data, "columns": [[0, 16], [20, 36], [32, 48]]})
    with pytest.raises(ConfigError, match="1 to 24 px long"):
        TilePlan.from_dict({**data, "columns": [[0, 30], [22, 48]]})
    with pytest.raises(ConfigError, match="not a tile plan"):
        TilePlan.from_dict({k: v for k, v in data.items() if k != "rows"})


# -- windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_windows_sum_to_more_than_zero_everywhere(geometry: tuple[int, int, int, int]) -> None:
    for plan in _plans(*geometry):
        assert _weight_sum(plan).min() > 0


def test_windows_of_a_roomy_plan_sum_to_one() -> None:
    # Tiles of at least 3 x overlap: two tiles per overlap, sin^2 + cos^2 = 1, nothing to normalise.
    for plan in _plans(48, 32, 24, 8):
        assert torch.allclose(_weight_sum(plan), torch.ones(1, 1, 32, 48, dtype=torch.float64))


def test_windows_are_one_inside_and_at_the_pictures_edge_and_fall_across_overlaps() -> None:
    plan = plan_tiles(48, 32, 24, 8)  # columns (0,22) (14,35) (27,48); rows (0,20) (12,32)
    corner, middle = window(plan.tiles[0], plan)[0, 0], window(plan.tiles[4], plan)[0, 0]
    assert torch.all(corner[:12, :14] == 1)  # the picture's edges and the interior: weight 1
    assert torch.all(middle[8:, 8:13] == 1)  # middle tile of the bottom row: 1 down to the bottom edge
    ramp = corner[0, 14:22]  # across the overlap with the next column
    assert torch.all(ramp[1:] < ramp[:-1]) and ramp[-1] < 0.01 and ramp[0] > 0.99
    assert corner[0, 21] > 0  # near 0, never 0: every pixel of a tile counts


# -- blending and cropping --------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_blending_crops_of_one_image_gives_back_the_image(geometry: tuple[int, int, int, int]) -> None:
    width, height = geometry[:2]
    image = to_tensor(make_image(width, height, seed=4), CPU)
    for plan in _plans(*geometry):
        blended = blend([(t, crop(image, t)) for t in reversed(plan.tiles)], plan)
        assert blended.shape == image.shape
        assert (blended - image).abs().max() < 1e-6


def test_blend_refuses_a_missing_tile_or_a_wrong_sized_image() -> None:
    plan = plan_tiles(48, 32, 24, 8)
    image = to_tensor(make_image(48, 32), CPU)
    pairs = [(t, crop(image, t)) for t in plan.tiles]
    with pytest.raises(ValueError, match=r"lacks \[3\]"):
        blend(pairs[:3] + pairs[4:], plan)
    with pytest.raises(ValueError, match="tile 2's image is"):
        blend([*pairs[:2], (plan.tiles[2], image[..., :5, :5]), *pairs[3:]], plan)


def test_tensor_and_pil_crops_agree_and_stay_inside_the_picture() -> None:
    picture = make_image(48, 32, seed=5)
    plan = plan_tiles(48, 32, 24, 8)
    for t in plan.tiles:
        assert torch.equal(to_tensor(crop_pil(picture, t), CPU), crop(to_tensor(picture, CPU), t))
    outside = Tile(0, 40, 0, 64, 20)
    with pytest.raises(ValueError, match="outside the 48 x 32 picture"):
        crop_pil(picture, outside)
    with pytest.raises(ValueError, match="outside"):
        crop(to_tensor(picture, CPU), outside)


# -- the seam metric --------------------------------------------------------------------------
# Measured over seeds 0-99 at 48 x 32, tiles 24 sharing 8 (half_band=1):
#   make_image as it is:        natural 0.92-1.11; +-0.25 steps pasted 1.89-2.19, blended 1.01-1.18
#   make_image, Gaussian r=1.5: natural 0.78-1.19; +-0.1 steps pasted 32-39, blended 2.4-3.3
# The bounds below leave room around those ranges.


@pytest.mark.parametrize("seed", range(3))
def test_a_plain_image_has_a_seam_ratio_near_one(seed: int) -> None:
    image = to_tensor(make_image(48, 32, seed=seed), CPU)
    for plan in _plans(48, 32, 24, 8):
        assert abs(seam_energy(image, plan)["ratio"] - 1) < 0.15


@pytest.mark.parametrize("seed", range(3))
def test_blended_tiles_show_a_far_smaller_seam_than_pasted_ones(seed: int) -> None:
    plan = plan_tiles(48, 32, 24, 8)
    textured = to_tensor(make_image(48, 32, seed=seed), CPU)
    tiles = _brightened(textured, plan, 0.25)
    pasted, blended = seam_energy(_paste(tiles, plan), plan), seam_energy(blend(tiles, plan), plan)
    assert pasted["ratio"] > 1.7 and blended["ratio"] < 1.3
    assert set(pasted) == {"border", "elsewhere", "ratio"}
    smooth = to_tensor(make_image(48, 32, seed=seed).filter(ImageFilter.GaussianBlur(1.5)), CPU)
    tiles = _brightened(smooth, plan, 0.1)
    pasted, blended = seam_energy(_paste(tiles, plan), plan), seam_energy(blend(tiles, plan), plan)
    assert pasted["ratio"] > 20 and blended["ratio"] < 5 and pasted["ratio"] > 8 * blended["ratio"]


def test_a_single_tile_has_no_seam_to_measure() -> None:
    with pytest.raises(ValueError, match="no seam"):
        seam_energy(torch.zeros(1, 3, 32, 48), plan_tiles(48, 32, 64, 8))
