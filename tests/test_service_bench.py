"""Smoke test of the service benchmark and the suite runner: a --quick run against real servers
and workers writes reports whose numbers hang together."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import run_all

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m bench.run_all --quick --parts service`` into a fresh folder (about a minute)."""
    out = tmp_path_factory.mktemp("bench")
    assert run_all.main(["--quick", "--parts", "service", "--out", str(out)]) == 0, \
        (out / "logs" / "service.log").read_text()[-4000:]
    return out


def test_service_report_numbers_hang_together(quick_run: Path) -> None:
    data = json.loads((quick_run / "service_cpu.json").read_text())
    assert data["weights"] == "random:0" and data["random_weights"] is True
    runs = {(r["mode"], r["kind"], r["workers"], r["batch_max"]) for r in data["runs"]}
    assert ("idle", "tiny", 1, 1) in runs
    for workers, batch in ((1, 1), (2, 1), (1, 2), (1, 4)):
        assert {("burst", k, workers, batch) for k in ("tiny", "realistic")} <= runs
    for run in data["runs"]:
        assert run["random_weights"] and run["jobs_per_min"] > 0
        assert run["engine_s_per_image_it_p50"] > 0
        assert 0 < run["optimise_share"] <= 1.2  # once per batch; timers of processes differ a little
        assert set(run["batch_sizes"]) <= set(range(1, run["batch_max"] + 1))
        for rec in run["records"]:
            assert rec["optimise_s"] > 0 and rec["iterations"] == run["iterations"]
            assert rec["overhead_s"] == pytest.approx(rec["total_s"] - rec["optimise_s"], abs=1e-3)
            assert 0 < rec["submit_to_start_s"] < rec["total_s"]
            # Every phase was seen (events arrived, step clocks recorded), none before its start.
            assert all(v is not None for v in rec["phases"].values()), rec
            assert all(v > -0.05 for v in rec["phases"].values()), rec
    idle = next(r for r in data["runs"] if r["mode"] == "idle")
    # One job at a time: the job's start waits only for the queue, not for other jobs.
    assert idle["submit_to_start_p50_s"] < idle["total_p50_s"] - idle["optimise_p50_s"]


def test_service_markdown_says_what_it_measured(quick_run: Path) -> None:
    text = (quick_run / "service_cpu.md").read_text()
    assert "**Weights: `random:0` (RANDOM weights)" in text
    assert "`uptime` before: `" in text and "load average" in text
    rows = re.findall(r"^\| (idle|burst) (tiny|realistic) \((\d+) px, (\d+) it\) \| (\d) \| (\d) \| \d+ \| "
                      r"[0-9.e+-]+ \| \*\*([0-9.e+-]+)\*\* \|", text, re.M)
    assert len(rows) == 9 and all(float(r[6]) > 0 for r in rows)
    assert ("tiny", "32", "2") in {r[1:4] for r in rows}
    for phrase in ("overhead = job total - optimisation", "download inputs", "bench/gpu_check.sh"):
        assert phrase in text
    pytest.importorskip("matplotlib")
    for png in ("service_cpu_workers.png", "service_cpu_batching.png"):
        assert (quick_run / png).stat().st_size > 1000 and f"]({png})" in text


def test_suite_report_links_parts_run_and_not_run(quick_run: Path) -> None:
    text = (quick_run / "REPORT.md").read_text()
    assert "[service_cpu.md](service_cpu.md), from this run" in text
    assert "`--quick` smoke run" in text and "jobs/min**" in text
    assert "No report yet: run `python -m bench.engine_bench`" in text  # engine not run here
    assert "![service_cpu_workers.png](service_cpu_workers.png)" in text or "## Plots" not in text
    assert "No GPU report here yet" in text


def test_suite_report_marks_a_failed_part_and_links_an_earlier_one(tmp_path: Path) -> None:
    (tmp_path / "engine_cpu.md").write_text("# engine\n")
    (tmp_path / "engine_cpu.json").write_text(json.dumps({
        "settings": {"quick": False},
        "ratios": {"s_per_it_speedup": {"128": {"seed": 4.5}}, "time_to_target_speedup": {"gatys": None}}}))
    failed = {"service": {"ran": True, "exit_code": 3, "seconds": 1.0, "log": "logs/service.log"}}
    text = run_all.write_report(tmp_path, failed, quick=False).read_text()
    assert "[engine_cpu.md](engine_cpu.md), from an earlier run (" in text
    assert "`seed` 4.50x" in text and "`gatys` not reached" in text
    assert "**FAILED in this run** (exit 3); see `logs/service.log`" in text


def test_submit_bench_times_both_producer_apps_on_a_real_redis() -> None:
    """bench/submit_bench.py: both apps submit against one redis-server; only one remembers."""
    from bench import submit_bench

    times = submit_bench.run(jobs=4, rounds=2)
    assert {k: len(v) for k, v in times.items()} == {"remembering": 4, "plain": 4}
    assert all(t > 0 for values in times.values() for t in values)
    text = submit_bench.report(times)
    assert re.search(r"median ratio remembering / plain: \*\*\d+\.\d\dx\*\*", text), text
