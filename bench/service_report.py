"""Markdown and PNG output of bench/service_bench.py (kept apart from the measuring code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import _fmt

PHASES = {
    "queue_to_validate_s": "submit -> validate starts (light queue)",
    "validate_s": "validate (read and decode inputs, check limits)",
    "handoff_to_stylize_s": "validate done -> stylize starts (GPU queue; includes waiting for a free worker)",
    "download_s": "stylize: spec, done/cancel checks, download inputs and checkpoint",
    "engine_extra_s": "stylize: engine call beyond optimisation (model lookup, batch window, image out)",
    "upload_s": "stylize: checkpoint, step metadata and work image upload, task bookkeeping",
    "handoff_to_publish_s": "stylize done -> publish starts (light queue)",
    "publish_s": "publish: result image, result.json",
}


def _f(value: Any, digits: int = 3) -> str:
    """The engine report's number format, three significant digits by default."""
    return _fmt(value, digits)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(runs: list[dict[str, Any]], out: Path, key: str, pick: Any, name: str, xlabel: str) -> Path | None:
    """One panel per kind of job (their scales differ tenfold), linear axes from 0, values marked."""
    plt = _pyplot()
    chosen = [r for r in runs if r["mode"] == "burst" and pick(r)]
    if plt is None or not chosen:
        return None
    kinds = sorted({r["kind"] for r in chosen}, reverse=True)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), dpi=110, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = sorted((r[key], r["jobs_per_min"], r) for r in chosen if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        for x, y, _ in pts:
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        r0 = pts[0][2]
        ax.set_title(f"{kind}: {r0['size']} px, {r0['iterations']} iterations", fontsize=9)
        ax.set_xticks([p[0] for p in pts])
        ax.set_ylim(0, max(p[1] for p in pts) * 1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("jobs per minute")
    fig.suptitle(f"Service throughput on CPU against {xlabel} (random:0 weights)", fontsize=9)
    fig.tight_layout()
    path = out / name
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_workers(runs: list[dict[str, Any]], out: Path) -> Path | None:
    return _plot(runs, out, "workers", lambda r: r["batch_max"] == 1, "service_cpu_workers.png",
                 "GPU-queue worker processes")


def plot_batching(runs: list[dict[str, Any]], out: Path) -> Path | None:
    return _plot(runs, out, "batch_max", lambda r: r["workers"] == 1, "service_cpu_batching.png",
                 "batch_max of one worker")


def _throughput(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| jobs | workers | batch_max | count | wall s | **jobs/min** | optimisation share | "
             "submit->start p50 / p95 s | job total p50 s | optimisation p50 s | overhead p50 / p95 s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(
            f"| {r['mode']} {r['kind']} ({r['size']} px, {r['iterations']} it) | {r['workers']} | "
            f"{r['batch_max']} | {r['jobs']} | {_f(r['wall_s'])} | **{_f(r['jobs_per_min'])}** | "
            f"{_f(r['optimise_share'], 2)} | {_f(r['submit_to_start_p50_s'])} / {_f(r['submit_to_start_p95_s'])} | "
            f"{_f(r['total_p50_s'])} | {_f(r['optimise_p50_s'])} | {_f(r['overhead_p50_s'])} / "
            f"{_f(r['overhead_p95_s'])} |")
    return lines


def _phases(runs: list[dict[str, Any]]) -> list[str]:
    heads = [f"{r['mode']} {r['kind']} w{r['workers']} b{r['batch_max']}" for r in runs]
    lines = ["| phase (median ms) | " + " | ".join(heads) + " |", "|---|" + "---|" * len(runs)]
    for key, words in PHASES.items():
        lines.append(f"| {words} | " + " | ".join(_ms(r["phases_p50_s"].get(key)) for r in runs) + " |")
    lines.append("| producer's submit() call | " + " | ".join(_ms(r["submit_call_p50_s"]) for r in runs) + " |")
    lines.append("| **overhead = job total - optimisation** | "
                 + " | ".join(f"**{_ms(r['overhead_p50_s'])}**" for r in runs) + " |")
    lines.append("| optimisation (engine timings.total_s) | "
                 + " | ".join(_ms(r["optimise_p50_s"]) for r in runs) + " |")
    return lines


def _gain(runs: list[dict[str, Any]], kind: str, workers: int, batch: int) -> str:
    base = next((r for r in runs if r["mode"] == "burst" and r["kind"] == kind
                 and r["workers"] == 1 and r["batch_max"] == 1), None)
    this = next((r for r in runs if r["mode"] == "burst" and r["kind"] == kind
                 and r["workers"] == workers and r["batch_max"] == batch), None)
    if base is None or this is None:
        return "-"
    return f"{this['jobs_per_min'] / base['jobs_per_min']:.2f}x"


def _scaling(runs: list[dict[str, Any]]) -> list[str]:
    bursts = [r for r in runs if r["mode"] == "burst"]
    lines = ["| jobs | workers | batch_max | jobs/min | vs 1 worker, batch 1 | batch sizes seen | "
             "engine s per image-iteration (p50) | job total p50 s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in bursts:
        lines.append(f"| {r['kind']} ({r['size']} px, {r['iterations']} it) | {r['workers']} | {r['batch_max']} | "
                     f"{_f(r['jobs_per_min'])} | {_gain(runs, r['kind'], r['workers'], r['batch_max'])} | "
                     f"{', '.join(map(str, r['batch_sizes'])) or '-'} | "
                     f"{_f(r.get('engine_s_per_image_it_p50'))} | {_f(r['total_p50_s'])} |")
    return lines


def write_service_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    before, after = report["machine_before"], report["machine_after"]
    plots = report.get("plots", {})
    lines = [
        "# Service benchmark: the queue's own cost (CPU, loopback)", "",
        f"**Weights: `{report['weights']}` (RANDOM weights): true timings, not real style transfers.**",
        "",
        "Real `redis-server` (broker and results) and moto's S3 server on loopback, real `celery worker` "
        "processes started with the argv and environment `stylequeue worker [--batch N]` gives them "
        "(prefork with one child per GPU-queue worker; a threads pool with N threads for batch_max N), "
        "plus one light worker (concurrency 2). The GPU-queue workers run on the **CPU** with one torch "
        "thread each. Jobs go in through `stylequeue.scheduler.submit()`; a burst submits all its jobs at "
        "once and its wall time runs from the first submit() call to the last result.json "
        "(`published_at`). `idle` jobs are submitted one at a time, each after the previous one finished: "
        "the latency of an empty queue. Each worker configuration first runs one warm-up job per task "
        "slot, twice over (models built), not counted. Deployment defaults otherwise (progress every 10 iterations, "
        "previews every 100, checkpoints every 50: none fall inside these short jobs).", "",
        f"Machine: {before['logical_cpus']} logical CPUs, shared with other work. "
        f"`uptime` before: `{before['uptime']}`; after: `{after['uptime']}`. "
        f"Whole run: {report['wall_seconds']} s.", "",
        "## Throughput", "", *_throughput(runs), "",
        "*optimisation share*: the engine's optimisation seconds (once per batch) over wall seconds x "
        "workers; the rest "
        "of a worker's time is the queue's cost and idle time. Latency and overhead in a burst include "
        "waiting behind other jobs; the `idle` row is the queue's own cost.", "",
        "## Where a job's time goes beyond its optimisation", "",
        "Medians per phase. Timestamps: the producer's clock at submit(), Celery's task events "
        "(task-started, task-succeeded) and the stylize step's wall clock in result.json "
        "(`steps[].clock`); all processes share one machine clock. Medians of phases need not add up "
        "to the median overhead. A task's end is its task-started event + its runtime.", "",
        *_phases(runs), "",
        "## Scaling with workers and batching", "", *_scaling(runs), "",
    ]
    for name, title in (("workers", "throughput against workers"), ("batching", "throughput against batch size")):
        if plots.get(name):
            lines += [f"![{title}]({plots[name]})", ""]
    lines += [
        "On a CPU a batch has no idle parallel hardware to fill, so what batching gains here comes "
        "from two other sources, both visible above: (1) the fixed cost of each iteration (Python, "
        "operator dispatch, tiny tensors) is paid once per batch instead of once per job: the "
        "*engine s per image-iteration* column; large at tiny sizes, small where arithmetic dominates; "
        "(2) the queue's per-job work (download, upload, bookkeeping) runs in the task threads while "
        "the engine computes. What it costs: a job waits up to the batch window (`batch_window_s`; in "
        "the phase *engine call beyond optimisation*) and its optimisation lasts as long as its whole "
        "batch's (*optimisation p50* above). The GPU's own batching gains "
        "(1, 2, 4, 8 jobs of 512 px on one H200) come from `bench/gpu_check.sh` (bench/README.md), not "
        "from this CPU run. Two worker processes share the machine's cores with the light worker, "
        "Redis, moto and the producer (and here with other users), so their scaling is bounded by "
        "the cores, not by the queue.",
    ]
    return "\n".join(lines) + "\n"
