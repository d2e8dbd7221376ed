"""Tiled against untiled pictures, and one tiled job on 1, 2 and 4 workers.

    python -m bench.tiles_bench --out bench/results/tiles            # CPU: ~25 min
    python -m bench.tiles_bench --quick --out /tmp/t                 # a smoke run

(a) Peak memory and seconds of one picture at rising sizes, untiled and tiled, each measured in a
    fresh process (``--one``) so that its peak resident memory is its own; the same iterations per
    scale and per tile, random weights (speed and memory do not depend on them).
(b) One tiled job through the real service (Redis, moto S3, celery workers on loopback, as
    bench/service_bench.py): seconds from submit to result with 1, 2 and 4 GPU-queue workers,
    each a one-thread CPU worker. On a 2-core machine more than two workers share two cores.
(c) With real VGG16 features (bench/quality.py's), a picture made untiled and tiled at the same
    size, side by side with a close-up of where tiles meet, and both scored by the quality
    evaluator and the seam measure: ``tiles_pictures.png``.
(d) With the same real features, how close a tiled picture's two distances come to the untiled
    picture's, by tile size against the picture, context and tile_style: small pictures (160 and
    256 px, 40 steps a scale), so that tiles are as small as VGG16's receptive fields (relu5_1:
    132 px), the case where tiling costs quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from bench.harness import REPO, machine_info
from bench.service_bench import gpu_workers, make_image, service_stack
from stylequeue.engine import preset, stylize
from stylequeue.engine.tensors import to_tensor
from stylequeue.engine.tiled import final_plan, stylize_tiled
from stylequeue.engine.tiles import seam_energy
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import load_weights
from stylequeue.scheduler import submit

def _config(size: int, tile: int, iterations: int) -> Any:
    return preset("default", size=size, scales=2, min_size=min(size // 2, tile), iterations=iterations,
                  tile_size=tile if tile < size else 0, tile_overlap=max(16, tile // 8))


def one(kind: str, size: int, tile: int, iterations: int) -> dict[str, Any]:
    """Measure one picture in this process (called through ``--one`` in a fresh one)."""
    torch.set_num_threads(2)
    model = VGGFeatures.from_weights(load_weights("random:0"), pooling="max")
    content, style = make_image(size, size * 2 // 3, 1), make_image(size // 2, size // 2, 2)
    cfg = _config(size, tile, iterations)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    if kind == "tiled":
        result = stylize_tiled(content, [style], cfg, model=model)
        tiles = len(final_plan(cfg, content.size).tiles)
    else:
        result = stylize(content, [style], cfg.replace(tile_size=0), model=model)
        tiles = 1
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "size": size, "tile": tile, "tiles": tiles, "iterations": iterations,
            "seconds": round(seconds, 2), "peak_rss_mb": round(peak), "rss_growth_mb": round(peak - before),
            "image": list(result.image.size)}


def memory_and_time(sizes: list[int], tile: int, iterations: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        for kind in ("untiled", "tiled"):
            out = subprocess.run([sys.executable, "-m", "bench.tiles_bench", "--one", kind, str(size), str(tile),
                                  str(iterations)], capture_output=True, text=True, cwd=REPO, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def fleet(size: int, tile: int, iterations: int, counts: list[int], workdir: Path) -> list[dict[str, Any]]:
    """One tiled job's submit-to-result seconds with ``counts`` GPU-queue workers."""
    rows = []
    with service_stack(workdir) as stack:
        content = stack.put_png("in/wide.png", make_image(size, size * 2 // 3, 1))
        for count in counts:
            with gpu_workers(stack, count, 1):
                params = {"size": size, "scales": 2, "min_size": min(size // 2, tile), "iterations": iterations,
                          "tile_size": tile, "tile_overlap": max(16, tile // 8)}
                began = time.monotonic()
                job = submit({"content": content, "styles": [stack.style], "params": params}, app=stack.app)
                summary = job.wait(timeout=3600)
                seconds = time.monotonic() - began
                meta = stack.read_json(summary["metadata_uri"])
                rows.append({"workers": count, "seconds": round(seconds, 1), "tiles": len(meta["tiles"]),
                             "workers_used": len({t["worker"] for t in meta["tiles"]})})
                print(rows[-1], flush=True)
    return rows


def pictures(out: Path, size: int, tile: int, iterations: int) -> dict[str, Any]:
    """Real VGG16 features: untiled and tiled at ``size``, scored, side by side with close-ups."""
    from bench.quality import DEFAULT_CACHE, Evaluator, real_weights
    from bench.seed_loop import pil_to_unit
    from stylequeue.engine.images import load_image

    torch.set_num_threads(2)
    weights = load_weights(real_weights(DEFAULT_CACHE))
    content = load_image(REPO / "examples" / "content" / "chelsea.jpg", max_pixels=10**8)
    style = load_image(REPO / "examples" / "style" / "starry_night.jpg", max_pixels=10**8)
    cfg = _config(size, tile, iterations).replace(network="vgg16")
    model = VGGFeatures.from_weights(weights, pooling=cfg.pooling)
    evaluate = Evaluator(VGGFeatures.from_weights(weights, pooling="max"), content, style)
    began = time.perf_counter()
    untiled = stylize(content, [style], cfg.replace(tile_size=0), model=model).image
    untiled_s = time.perf_counter() - began
    began = time.perf_counter()
    tiled = stylize_tiled(content, [style], cfg, model=model).image
    tiled_s = time.perf_counter() - began
    plan = final_plan(cfg, content.size)
    scores = {}
    for name, image, seconds in (("untiled", untiled, untiled_s), ("tiled", tiled, tiled_s)):
        c, s = evaluate(pil_to_unit(image))
        seams = seam_energy(to_tensor(image, torch.device("cpu")), plan)
        scores[name] = {"seconds": round(seconds, 1), "content": round(c, 4), "style": round(s, 4),
                        "seam_ratio": round(seams["ratio"], 3)}
    _sheet(untiled, tiled, plan, scores, out / "tiles_pictures.png")
    return {"size": size, "tile": tile, "overlap": plan.overlap, "tiles": len(plan.tiles), "iterations": iterations,
            "scores": scores}


GEOMETRIES: tuple[tuple[int, dict[str, Any]], ...] = (
    (160, dict(tile_size=112, tile_overlap=24)),
    (160, dict(tile_size=112, tile_overlap=24, tile_style="global")),
    (160, dict(tile_size=96, tile_overlap=24)),
    (160, dict(tile_size=96, tile_overlap=24, tile_context=0)),
    (256, dict(tile_size=128, tile_overlap=32)),
    (256, dict(tile_size=128, tile_overlap=32, tile_style="global")),
    (256, dict(tile_size=128, tile_overlap=32, tile_passes=2)),
    (256, dict(tile_size=160, tile_overlap=48)),
)


def geometry(iterations: int = 40, cases: Sequence[tuple[int, dict[str, Any]]] = GEOMETRIES) -> list[dict[str, Any]]:
    """(d): each case's distances beside the untiled picture's at its size (the module docstring)."""
    from bench.quality import DEFAULT_CACHE, Evaluator, real_weights
    from bench.seed_loop import pil_to_unit
    from stylequeue.engine.images import load_image

    torch.set_num_threads(2)
    weights = load_weights(real_weights(DEFAULT_CACHE))
    content = load_image(REPO / "examples" / "content" / "chelsea.jpg", max_pixels=10**8)
    style = load_image(REPO / "examples" / "style" / "starry_night.jpg", max_pixels=10**8)
    model = VGGFeatures.from_weights(weights, pooling="max")
    rows, untiled = [], {}
    for size, changes in cases:
        evaluate = Evaluator(model, content, style, size=size)
        cfg = preset("default", network="vgg16", size=size, scales=2, min_size=size // 2, iterations=iterations, seed=0)
        if size not in untiled:
            untiled[size] = evaluate(pil_to_unit(stylize(content, [style], cfg, model=model).image))
        tiled_cfg = cfg.replace(**changes)
        c, s = evaluate(pil_to_unit(stylize_tiled(content, [style], tiled_cfg, model=model).image))
        base = untiled[size]
        rows.append({"size": size, "tile": tiled_cfg.tile_size, "overlap": tiled_cfg.tile_overlap,
                     "context": tiled_cfg.tile_context, "tile_style": tiled_cfg.tile_style,
                     "tiles": len(final_plan(tiled_cfg, content.size).tiles),
                     "untiled": [round(base[0], 4), round(base[1], 4)], "tiled": [round(c, 4), round(s, 4)],
                     "content_ratio": round(c / base[0], 3), "style_ratio": round(s / base[1], 3)})
        print(rows[-1], flush=True)
    return rows


def _sheet(untiled: Image.Image, tiled: Image.Image, plan: Any, scores: dict[str, Any], path: Path) -> None:
    """The two pictures, then a 3x close-up of the same corner where four tiles meet in each."""
    xs, ys = plan.seams
    x, y = (xs[0] if xs else plan.width // 2), (ys[0] if ys else plan.height // 2)
    box = (max(0, x - 48), max(0, y - 32), min(plan.width, x + 48), min(plan.height, y + 32))
    zoom = [im.crop(box).resize(((box[2] - box[0]) * 3, (box[3] - box[1]) * 3), Image.Resampling.NEAREST)
            for im in (untiled, tiled)]
    width = untiled.width * 2 + 30
    height = untiled.height + zoom[0].height + 70
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, im) in enumerate((("untiled", untiled), ("tiled", tiled))):
        left = 10 + i * (untiled.width + 10)
        sheet.paste(im, (left, 10))
        s = scores[name]
        draw.text((left, untiled.height + 14), f"{name}: {s['seconds']} s, content {s['content']}, "
                  f"style {s['style']}, seams {s['seam_ratio']}", fill="black")
        sheet.paste(zoom[i], (left, untiled.height + 34))
        if name == "tiled":  # where the close-up is, and the tile borders (middles of the overlaps)
            for sx in xs:
                draw.line([(left + sx, 10), (left + sx, 16)], fill="red")
            for sy in ys:
                draw.line([(left, 10 + sy), (left + 6, 10 + sy)], fill="red")
    draw.text((10, height - 18), f"close-ups: 3x, {box[2] - box[0]}x{box[3] - box[1]} px where tiles meet "
              "(red ticks: tile borders)", fill="black")
    sheet.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/tiles"))
    p.add_argument("--sizes", default="256,384,512,768")
    p.add_argument("--tile", type=int, default=192)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--fleet-size", type=int, default=384)
    p.add_argument("--fleet-iterations", type=int, default=20)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--picture-size", type=int, default=512)
    p.add_argument("--picture-iterations", type=int, default=100)
    p.add_argument("--picture-tile", type=int, default=256, help="(c)'s tiles: about twice relu5_1's receptive field")
    p.add_argument("--geometry-iterations", type=int, default=40, help="(d); 0 leaves it out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--one", nargs=4, metavar=("KIND", "SIZE", "TILE", "ITERATIONS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    from bench.tiles_report import write_tiles_report

    args = parse_args(argv)
    if args.one:
        kind, size, tile, iterations = args.one
        print(json.dumps(one(kind, int(size), int(tile), int(iterations))))
        return None
    if args.quick:
        args.sizes, args.tile, args.iterations, args.workers = "160", 96, 2, "1,2"
        args.fleet_size, args.fleet_iterations, args.picture_size, args.picture_iterations = 160, 2, 0, 0
        args.geometry_iterations = 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "settings": {k: str(v) for k, v in vars(args).items()}}
    report["memory_and_time"] = memory_and_time([int(s) for s in args.sizes.split(",")], args.tile, args.iterations)
    with tempfile.TemporaryDirectory(prefix="stylequeue-tiles-bench-") as work:
        report["fleet"] = fleet(args.fleet_size, args.tile, args.fleet_iterations,
                                [int(w) for w in args.workers.split(",")], Path(work))
    if args.picture_size:
        report["pictures"] = pictures(args.out, args.picture_size, args.picture_tile, args.picture_iterations)
    if args.geometry_iterations:
        report["geometry"] = geometry(args.geometry_iterations)
    (args.out / "tiles.json").write_text(json.dumps(report, indent=1))
    text = write_tiles_report(report)
    (args.out / "tiles.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
