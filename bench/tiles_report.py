"""Markdown for bench/tiles_bench.py (kept apart from the measuring code)."""

from __future__ import annotations

from typing import Any


def write_tiles_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Tiled against untiled (bench/tiles_bench.py)", "",
             f"CPU: {m.get('cpu')} ({m.get('logical_cpus')} logical CPUs), torch {m.get('torch')}. Random",
             "weights for (a) and (b) (speed and memory do not depend on them); real VGG16 features for (c) and (d).", "",
             "## (a) One picture: peak memory and seconds", "",
             "Each run in a fresh process; 'growth' is the resident memory the run added to the process",
             "(torch and the model loaded). Same iterations per scale and per tile; coarse scale at half size.", "",
             "| size | kind | tiles | seconds | peak RSS MB | growth MB |", "|---|---|---|---|---|---|"]
    for r in report["memory_and_time"]:
        lines.append(f"| {r['size']} | {r['kind']} | {r['tiles']} | {r['seconds']} | {r['peak_rss_mb']} | {r['rss_growth_mb']} |")
    lines += ["", "## (b) One tiled job through the service, 1, 2, 4 workers", "",
              "Submit to result, real Redis, moto S3 and celery workers on loopback; each GPU-queue",
              "worker a one-thread CPU process. This machine has 2 cores: past two workers they share them.", "",
              "| workers | seconds | speed-up | tiles | workers that ran tiles |", "|---|---|---|---|---|"]
    base = report["fleet"][0]["seconds"] if report["fleet"] else None
    for r in report["fleet"]:
        gain = f"{base / r['seconds']:.2f}x" if base else "-"
        lines.append(f"| {r['workers']} | {r['seconds']} | {gain} | {r['tiles']} | {r['workers_used']} |")
    pic = report.get("pictures")
    if pic:
        lines += ["", "## (c) The same picture untiled and tiled, real VGG16 features", "",
                  f"{pic['size']} px, tiles of {pic['tile']} px overlapping by {pic['overlap']} ({pic['tiles']} tiles),",
                  f"{pic['iterations']} iterations per scale and per tile. Distances: bench/quality.py's evaluator;",
                  "seams: gradient energy in 3 px bands on the tile borders over the rest (1 = no seam).", "",
                  "| | seconds | content distance | style distance | seam ratio |", "|---|---|---|---|---|"]
        for name, s in pic["scores"].items():
            lines.append(f"| {name} | {s['seconds']} | {s['content']} | {s['style']} | {s['seam_ratio']} |")
        lines += ["", "![untiled, tiled, close-ups](tiles_pictures.png)"]
    rows = report.get("geometry")
    if rows:
        lines += ["", "## (d) Tiles as small as VGG's receptive fields: tiled over untiled distances", "",
                  "Real VGG16 features, chelsea x The Starry Night, 40 steps a scale (coarse scale at half size).",
                  "A ratio of 1 is the untiled picture's distance; below 1 is closer to the target.", "",
                  "| size | tile / overlap / context | tile_style | tiles | untiled (content, style) | tiled | content ratio | style ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['size']} | {r['tile']} / {r['overlap']} / {r['context']} | {r['tile_style']} | {r['tiles']} | "
                         f"{r['untiled'][0]}, {r['untiled'][1]} | {r['tiled'][0]}, {r['tiled'][1]} | "
                         f"{r['content_ratio']} | {r['style_ratio']} |")
    return "\n".join(lines) + "\n"
