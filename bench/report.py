"""Markdown and PNG output for the engine benchmarks (kept apart from the measuring code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


_PRESET_KEYS = ("optimizer", "lr", "betas", "space", "content_layers", "style_layers", "style_weight",
                "gram_norm", "pooling", "init", "scales", "ema_decay", "tv_weight")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def plot_curves(target: dict[str, Any], path: Path) -> Path | None:
    """Seed objective against active seconds, one line per contender; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, c in target["contenders"].items():
        pts = [(t, v) for _, t, v in c["curve"] if v is not None]
        if pts:
            label = f"{name} (time = steps x its s/it)" if name == "seed loop" else name
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker=".", markersize=3)
    if target.get("target") is not None:
        ax.axhline(target["target"], color="grey", linestyle="--",
                   label=f"seed loop after {target['target_steps']} steps")
    ax.set_yscale("log")
    ax.set_xlabel("active seconds (objective evaluation excluded)")
    ax.set_ylabel("seed objective (content + 100 * style)")
    ax.set_title(f"Seed objective vs time, {target['size']} px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _machine_lines(m: dict[str, Any], weights: dict[str, Any]) -> list[str]:
    lines = [
        "| | |", "|---|---|",
        f"| CPU | {m.get('cpu')} ({m.get('logical_cpus')} logical CPUs) |",
        f"| torch | {m.get('torch')}, {m.get('torch_threads')} threads |",
        f"| device | {m.get('device')}{' (' + m['gpu'] + ')' if m.get('gpu') else ''} |",
        f"| load average (1, 5, 15 min) at start | {_fmt(m.get('load_average_at_start'))} |",
        f"| load average at end | {_fmt(m.get('load_average_at_end'))} |",
        f"| weights | {weights['source']}{' (RANDOM weights: timings and losses only, not real style transfer)' if weights['random'] else ''} |",
    ]
    return lines


def _speed_lines(speed: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    lines = ["| size (longest side) | contender | s / iteration (median) | seed loop / contender | chunks (s/it) |",
             "|---|---|---|---|---|"]
    for size, entries in speed.items():
        for name, e in entries.items():
            ratio = ratios["s_per_it_speedup"][size].get(name) if name != "seed loop" else 1.0
            chunks = ", ".join(f"{c:.4g}" for c in e["chunks_s_per_it"])
            err = f" ERROR: {e['error']}" if e.get("error") else ""
            lines.append(f"| {size} | {name} | {_fmt(e['s_per_it'])} | {_fmt(ratio, 3)}x | {chunks}{err} |")
    return lines


def _target_lines(target: dict[str, Any], ratios: dict[str, Any]) -> list[str]:
    lines = ["| contender | reached? | seconds to target | iterations | seed loop / contender | ran (s, it) | best objective |",
             "|---|---|---|---|---|---|---|"]
    for name, c in target["contenders"].items():
        ratio = 1.0 if name == "seed loop" else ratios["time_to_target_speedup"].get(name)
        reached = "yes" if c["reached"] else "**not reached**"
        err = f" ERROR: {c['error']}" if c.get("error") else ""
        lines.append(
            f"| {name} | {reached}{err} | {_fmt(c['seconds'])} | {_fmt(c['iterations'])} | "
            f"{_fmt(ratio, 3)}{'x' if ratio else ''} | {_fmt(c['ran_seconds'])}, {_fmt(c['ran_iterations'])} | "
            f"{_fmt(c['best_objective'])} |"
        )
    return lines


def write_engine_report(report: dict[str, Any]) -> str:
    """The Markdown report of bench/engine_bench.py."""
    m, target = report["machine"], report["time_to_target"]
    device = m["device"]
    lines = [
        f"# Engine vs the seed's loop ({device})",
        "",
        "Made by `python -m bench.engine_bench` in one run: same images (examples/content/chelsea.jpg,",
        "examples/style/starry_night.jpg), same weights, same device; contenders interleaved (each runs",
        "a chunk, then hands over), each timed only while it computes. See bench/README.md.",
        "",
    ]
    if m["device"].startswith("cpu"):
        lines += ["**On a CPU only the RATIOS mean anything**; absolute seconds come from a GPU run",
                  "(bench/gpu_check.sh). This machine is shared, so the load average is shown.", ""]
    lines += ["## Machine", ""] + _machine_lines(m, report["weights"]) + [""]
    lines += ["## (a) Seconds per iteration", "",
              "Median over chunks after a warm-up chunk. 'seed loop / contender' above 1: the contender",
              "is faster per iteration. A `gatys` iteration is one L-BFGS step (one loss evaluation).", ""]
    lines += _speed_lines(report["speed"], report["ratios"]) + [""]
    lines += [f"## (b) Time to the seed loop's {target['target_steps']}-step loss at {target['size']} px", "",
              f"Target: seed objective = {_fmt(target['target'])} after {target['target_steps']} steps of the seed's",
              "loop (computed by `SeedLoop(shortcut=True)`, the same trajectory without the seed's waste).",
              f"The seed loop's time to it = {target['target_steps']} steps x its {_fmt(target['seed_s_per_it'])} s/it",
              f"measured in (a) = {_fmt(target['seed_loop_seconds'])} s. Every contender's image (rounded to 8",
              "bits) is scored with the same function, `bench.seed_loop.seed_objective` (the seed's content +",
              "100 * style on its five layers), every few iterations; scoring time is excluded. Each preset",
              f"stops when it reaches the target or after {_fmt(target['cap_seconds'])} active seconds (the seed loop's",
              "time, or --max-seconds if smaller): **not reached** means slower than the seed loop, or never.", ""]
    lines += _target_lines(target, report["ratios"]) + [""]
    if report.get("plot"):
        lines += ["## (c) Objective against time", "", f"![curves]({report['plot']})", ""]
    lines += ["## Presets as run", "", "| preset | " + " | ".join(_PRESET_KEYS) + " |",
              "|---|" + "---|" * len(_PRESET_KEYS)]
    for name, cfg in report.get("presets", {}).items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cfg.get(k)) for k in _PRESET_KEYS) + " |")
    lines += ["", "(sizes and iterations are the benchmark's, not the preset's)", ""]
    lines += [f"Whole run: {report['wall_seconds']} s wall. Raw numbers: the JSON file beside this one.", ""]
    return "\n".join(lines)
