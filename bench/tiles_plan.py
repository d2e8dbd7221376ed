"""What a 4096 px and an 8192 px job would cost on a fleet of H200s: a plan, not a measurement.

    python -m bench.tiles_plan --out bench/results/tiles/plan.md [--tflops 300] [--memory-gib 139]

From the analytic FLOP count of one iteration (bench/flops.py) at each stage of the job the service
would run (memory.tiling picks the tiles a worker of that memory gets; smaller tiles may be asked
for to spread the job wider), and one assumed sustained throughput per GPU (``--tflops``). No GPU
has run this project yet (issue 11): every second below is FLOPs over that assumption, so read the
columns against each other (how a job splits over 1 to 16 workers), not as timings. The CPU
figures of bench/tiles_bench.py check the part that can be checked here: that a tiled final scale
costs what its tiles' pixels say (overlap included).

A job: the coarse scale on one GPU (untiled, up to the largest size that fits), then the final
scale's tiles, each a GPU task on any worker (a Celery chord), then a light blend. Each worker
that runs tiles computes, once per pass, the style targets (one forward of the style at the whole
picture's scale) and the picture's statistics that every tile's objective needs (engine/tiled.py
``picture_stats``: one no-grad forward of each tile's region to the deepest style layer, and one to
the content layer). Each tile is optimised inside ``tile_context`` px of picture on every side,
which its FLOPs include. Transfers (tile PNGs to and from S3) are left out: tens of MB a tile.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from bench.flops import engine_iteration_flops, forward_flops
from stylequeue.engine import preset
from stylequeue.engine.config import StyleConfig, scale_sizes, style_side
from stylequeue.engine.images import fit_longest
from stylequeue.engine.memory import largest_side, tiling
from stylequeue.engine.network import network
from stylequeue.engine.tiled import tile_region
from stylequeue.engine.tiles import plan_tiles

ASPECT = (3, 2)  # a landscape print: 4096 x 2731, 8192 x 5461
WORKERS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Stage:
    name: str
    tflop: float  # per task
    tasks: int
    once_tflop: float = 0.0  # per worker that runs any of its tasks (style targets, picture statistics)


def job_stages(config: StyleConfig) -> list[Stage]:
    """The stages of ``config``'s job: untiled scales, then the final scale's tiles."""
    net = network(config.network)
    width, height = ASPECT[0] * 10_000, ASPECT[1] * 10_000
    layers = (config.content_layers, config.style_layers)
    stages = []
    sizes = scale_sizes(config.size, config.min_size, config.scales)
    for size in sizes[:-1] if config.tile_size else sizes:
        w, h = fit_longest((width, height), size)
        stages.append(Stage(f"scale {w}x{h}", config.iterations * engine_iteration_flops(h, w, *layers, net) / 1e12, 1))
    if config.tile_size:
        w, h = fit_longest((width, height), config.size)
        plan = plan_tiles(w, h, config.tile_size, config.tile_overlap)
        # A tile runs inside its context (engine/tiled.py): the largest region, not the largest tile.
        tile = max((tile_region(plan, t, config.tile_context) for t in plan.tiles), key=lambda t: t.width * t.height)
        per_tile = config.iterations * engine_iteration_flops(tile.height, tile.width, *layers, net)
        sw, sh = fit_longest((width, height), style_side(config, config.size))
        targets = forward_flops(sh, sw, net.deepest(config.style_layers).name, net)  # once per worker
        regions = [tile_region(plan, t, config.tile_context) for t in plan.tiles]
        targets += sum(forward_flops(r.height, r.width, net.deepest(names).name, net)
                       for r in regions for names in layers)  # picture_stats, once per worker and pass
        stages.append(Stage(f"{len(plan.tiles)} tiles of at most {config.tile_size} px, regions up to {tile.width}x{tile.height}",
                            per_tile / 1e12,
                            len(plan.tiles) * config.tile_passes, targets / 1e12))
    return stages


def seconds(stages: list[Stage], workers: int, tflops: float) -> float:
    """Wall seconds with ``workers`` GPUs: untiled stages in turn, tiles in waves of ``workers``."""
    return sum((s.once_tflop + s.tflop * math.ceil(s.tasks / workers)) / tflops for s in stages)


def report(memory_gib: float, tflops: float) -> str:
    memory = int(memory_gib * 2**30)
    lines = [
        "# A 4096 px and an 8192 px job on a fleet of H200s (a plan from FLOP counts, not measured)",
        "",
        f"`python -m bench.tiles_plan --memory-gib {memory_gib:g} --tflops {tflops:g}`: `default` preset (VGG19, "
        f"{StyleConfig().iterations} steps a scale), bf16, a {memory_gib:g} GiB worker, an assumed **{tflops:g} TFLOP/s** "
        "sustained per GPU (no GPU has run this project yet: issue 11). Seconds are TFLOP over that figure; "
        "compare the columns with each other. Aspect 3:2.",
        "",
    ]
    for dtype_bytes, name in ((2, "bf16"), (4, "fp32")):
        fit = largest_side([*StyleConfig().content_layers, *StyleConfig().style_layers], memory,
                           dtype_bytes=dtype_bytes, network=network("vgg19"))
        lines.append(f"- largest square one worker optimises untiled ({name}): **{fit} px**")
    lines += ["", "| job | stages (TFLOP per task x tasks) | " + " | ".join(f"{n} GPU" for n in WORKERS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in WORKERS) + " |"]
    for size in (4096, 8192):
        base = preset("default", size=size)
        auto = base.replace(**tiling(base, memory, dtype_bytes=2))
        variants = [("as submitted (memory.tiling)", auto)]
        for tile in (2048, 1024):
            variants.append((f"tile_size {tile}", auto.replace(scales=2, min_size=min(size // 2, largest_side(
                [*base.content_layers, *base.style_layers], memory, dtype_bytes=2)), tile_size=tile,
                tile_overlap=tile // 8)))
        for label, config in variants:
            stages = job_stages(config)
            cells = " | ".join(f"{seconds(stages, n, tflops):.0f} s" for n in WORKERS)
            parts = "; ".join(f"{s.name}: {s.tflop:.0f} x {s.tasks}" + (f" + {s.once_tflop:.0f} a worker" if s.once_tflop else "")
                              for s in stages)
            lines.append(f"| {size} px, {label} | {parts} | {cells} |")
    lines += [
        "",
        "Reading it: the coarse scale is serial (one GPU), so past a few workers it is what remains;",
        "smaller tiles spread the final scale wider at the price of more overlap (an eighth of a tile",
        "on each shared side) and of the style targets and picture statistics each worker makes once per pass.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/tiles/plan.md"))
    p.add_argument("--memory-gib", type=float, default=139.0, help="one worker's device memory")
    p.add_argument("--tflops", type=float, default=300.0, help="assumed sustained TFLOP/s per GPU")
    args = p.parse_args()
    text = report(args.memory_gib, args.tflops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
