"""One command for the whole CPU benchmark suite, and one report that links every part.

```
python -m bench.run_all                         # engine (full) + service (full) -> bench/results/REPORT.md
python -m bench.run_all --quick --out /tmp/b    # smoke run of both, minutes
python -m bench.run_all --parts service         # re-run one part; the others' last reports are linked
```

Each part runs in its own process (``python -m bench.engine_bench``, ``python -m
bench.service_bench``), so one part's torch threads or servers never touch another's, and a
failing part does not stop the rest: REPORT.md says which failed and where its log is. Parts not
run are linked from their last report in ``--out``, with that report's date, so REPORT.md always
covers the whole suite. GPU figures come from ``bench/gpu_check.sh OUT_DIR`` on a GPU machine;
REPORT.md links any ``gpu_report.md`` found under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PARTS = ("engine", "service")


@dataclass(frozen=True)
class Part:
    """One benchmark module: how to run it and what it writes."""

    name: str
    module: str
    report: str  # Markdown file written into --out
    data: str  # its JSON
    title: str

    def argv(self, out: Path, quick: bool) -> list[str]:
        return [sys.executable, "-m", self.module, "--out", str(out), *(["--quick"] if quick else [])]


SUITE = {
    "engine": Part("engine", "bench.engine_bench", "engine_cpu.md", "engine_cpu.json",
                   "Engine: the presets against the seed's loop (s/iteration, time to the seed's loss)"),
    "service": Part("service", "bench.service_bench", "service_cpu.md", "service_cpu.json",
                    "Service: jobs/min with 1 and 2 workers, queue latency and overhead, batching"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run of every part (overwrites the reports in --out: use another --out "
                        "to keep committed results)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = p.parse_args(argv)
    args.part_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(args.part_list) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def run_part(part: Part, out: Path, quick: bool) -> dict[str, Any]:
    """Run one part as a subprocess, its output in ``<out>/logs/<name>.log``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{part.name}.log"
    started = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        code = subprocess.run(part.argv(out, quick), stdout=log, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode
    print(f"{part.name}: exit {code} after {time.time() - started:.0f} s (log {log_path})", flush=True)
    return {"ran": True, "exit_code": code, "seconds": round(time.time() - started, 1),
            "log": str(log_path.relative_to(out))}


def _date(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def engine_headline(data: dict[str, Any]) -> list[str]:
    """Seed loop / preset ratios: seconds per iteration, and time to the seed loop's loss."""
    ratios = data.get("ratios", {})
    lines = []
    for size, entries in ratios.get("s_per_it_speedup", {}).items():
        parts = ", ".join(f"`{n}` {v:.2f}x" for n, v in entries.items() if v)
        lines.append(f"- s/iteration at {size} px, seed loop / preset: {parts}")
    target = {n: v for n, v in ratios.get("time_to_target_speedup", {}).items()}
    if target:
        parts = ", ".join(f"`{n}` {v:.2f}x" if v else f"`{n}` not reached" for n, v in target.items())
        lines.append(f"- time to the seed loop's loss, seed loop / preset: {parts}")
    return lines


def service_headline(data: dict[str, Any]) -> list[str]:
    """Jobs/min of each burst, and the queue's own cost from the idle run."""
    lines = []
    for run in data.get("runs", []):
        label = f"{run['kind']} jobs ({run['size']} px, {run['iterations']} it)"
        if run["mode"] == "idle":
            lines.append(f"- empty queue, {label}: submit -> start p50 {run['submit_to_start_p50_s'] * 1000:.0f} ms, "
                         f"overhead beyond optimisation p50 {run['overhead_p50_s'] * 1000:.0f} ms")
        else:
            lines.append(f"- {label}, {run['workers']} worker(s), batch_max {run['batch_max']}: "
                         f"**{run['jobs_per_min']:.1f} jobs/min**")
    return lines


HEADLINES = {"engine": engine_headline, "service": service_headline}


def _part_section(part: Part, out: Path, status: dict[str, Any] | None) -> list[str]:
    report, data_path = out / part.report, out / part.data
    lines = [f"## {part.title}", ""]
    if status is not None and status["exit_code"] != 0:
        lines += [f"**FAILED in this run** (exit {status['exit_code']}); see `{status['log']}`.", ""]
    if not report.exists():
        return lines + ["No report yet: run `python -m " + part.module + "`.", ""]
    when = "this run" if status is not None and status["exit_code"] == 0 else f"an earlier run ({_date(report)})"
    lines += [f"Report: [{part.report}]({part.report}), from {when}.", ""]
    data = _load(data_path)
    if data is not None:
        if data.get("settings", {}).get("quick") in (True, "True"):
            lines += ["*(a `--quick` smoke run: tiny sizes, not a measurement)*", ""]
        lines += HEADLINES[part.name](data) + [""]
    return lines


def write_report(out: Path, statuses: dict[str, dict[str, Any]], quick: bool) -> Path:
    """REPORT.md: every part's headline numbers, its report, its plots, and the GPU report."""
    lines = [
        "# stylequeue benchmarks: the CPU suite", "",
        f"Written by `python -m bench.run_all{' --quick' if quick else ''}` at "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. **Weights: `random:0` (random "
        "weights)**: real timings and losses, not real style transfers. CPU only: the ratios carry over, "
        "absolute seconds come from the GPU run. How each part measures: bench/README.md.", "",
    ]
    for name in PARTS:
        lines += _part_section(SUITE[name], out, statuses.get(name))
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    gpu = sorted(out.rglob("gpu_report.md"))
    lines += ["## GPU", ""]
    lines += ([f"- [{g.relative_to(out)}]({g.relative_to(out)}) ({_date(g)})" for g in gpu] or
              ["No GPU report here yet: run `bench/gpu_check.sh OUT_DIR` on a GPU machine (one H200, under "
               "8 minutes) and commit OUT_DIR under bench/results/."])
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    statuses = {name: run_part(SUITE[name], args.out, args.quick) for name in args.part_list}
    path = write_report(args.out, statuses, args.quick)
    print(path.read_text())
    return max((s["exit_code"] for s in statuses.values()), default=0)


if __name__ == "__main__":
    sys.exit(main())
