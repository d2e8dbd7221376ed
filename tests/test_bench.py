"""Smoke tests of bench/: the seed re-creation is faithful, the harness is fair, the scripts run
end to end at tiny sizes and their reports carry the numbers they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from bench import engine_bench, flops, gpu_bench, preset_search
from bench.harness import Contender, Objective, load_inputs, run_interleaved
from bench.seed_loop import SeedLoop, seed_objective
from stylequeue.engine import VGGFeatures
from stylequeue.engine.losses import gram_matrix
from stylequeue.engine.weights import load_weights

RELU_1 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
NUMBER = r"[0-9][0-9.e+-]*"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights():
    return load_weights("random:0")


@pytest.fixture(scope="module")
def inputs():
    return load_inputs()


def test_seed_loop_keeps_the_seeds_costs_and_defects(weights, inputs):
    loop = SeedLoop(*inputs, weights.state_dict, max_size=64)
    # 400x266 content: the seed truncates to 64x42; its style resize swaps width and height.
    assert tuple(loop.content.shape) == (1, 3, 42, 64)
    assert tuple(loop.style.shape) == (1, 3, 64, 42)
    calls = {"n": 0}
    hooks = [m.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
             for m in loop.vgg.vgg]
    loop.step()
    for h in hooks:
        h.remove()
    assert len(loop.vgg.vgg) == 37 and calls["n"] == 3 * 37  # all modules, three passes per step
    params = list(loop.vgg.parameters())
    assert all(p.requires_grad for p in params)
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params) >= 10
    # In-place ReLU: the "conv" outputs the seed selects are non-negative (relu*_1 in effect).
    with torch.no_grad():
        assert all(bool((f >= 0).all()) for f in loop.vgg(loop.content))


def test_shortcut_loop_follows_the_same_trajectory(weights, inputs):
    slow = SeedLoop(*inputs, weights.state_dict, max_size=64)
    fast = SeedLoop(*inputs, weights.state_dict, max_size=64, shortcut=True)
    for _ in range(3):
        a, b = slow.step(), fast.step()
        assert math.isclose(float(a), float(b), rel_tol=1e-5)
    assert torch.allclose(slow.target, fast.target, atol=1e-5)


def test_seed_objective_matches_the_engines_losses(weights, inputs):
    """The seed's loss = engine losses on relu*_1 with 'sqrt_chw' Grams and weights 1 / 100."""
    obj = Objective.build(*inputs, 64, weights.state_dict, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(obj.content.shape, generator=gen)
    model = VGGFeatures(weights.state_dict, pooling="max")
    with torch.no_grad():
        f_img, f_con, f_sty = (model(x, RELU_1) for x in (image, obj.content, obj.style))
        content = sum(((f_img[n] - f_con[n]) ** 2).mean() for n in RELU_1)
        style = sum(((gram_matrix(f_img[n], "sqrt_chw") - gram_matrix(f_sty[n], "sqrt_chw")) ** 2).mean()
                    for n in RELU_1)
    expected = float(content + 100 * style)
    assert math.isclose(seed_objective(image, obj.content, obj.style, obj.model), expected, rel_tol=1e-4)
    assert seed_objective(obj.content, obj.content, obj.content, obj.model) == 0.0


def test_flop_counts():
    # VGG19's convs at 224x224: the well-known 19.5 G multiply-adds.
    full = flops.forward_flops(224, 224)
    assert abs(full - 39.0e9) / 39.0e9 < 0.01
    assert flops.feature_shapes(224, 224, ["relu4_2", "pool5"]) == {"relu4_2": (512, 28, 28),
                                                                    "pool5": (512, 7, 7)}
    engine_it = flops.engine_iteration_flops(85, 128, ("relu4_2",), RELU_1)
    assert 4 < flops.seed_step_flops(85, 128) / engine_it < 5
    assert flops.engine_iteration_flops(85, 128, ("relu1_1",), ("relu1_1",)) < engine_it


class _Fake(Contender):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def run(self, tick, every, max_iterations):
        for it in range(every, max_iterations + 1, every):
            self.log.append(self.name)
            if tick(it, lambda: torch.zeros(1)):
                return


def test_interleaver_takes_turns_and_stops_on_request():
    log: list[str] = []
    records = run_interleaved([_Fake("A", log), _Fake("B", log), _Fake("C", log)], every=1,
                              max_iterations=4, max_seconds=float("inf"), device=torch.device("cpu"),
                              stop_when=lambda r: r.name == "B" and r.points[-1][0] >= 2)
    assert log == ["A", "B", "C", "A", "B", "C", "A", "C", "A", "C"]
    assert [r.points[-1][0] for r in records] == [4, 2, 4]
    assert all(t >= 0 for r in records for _, t, _ in r.points)


def _table_rows(md: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_engine_bench_quick_end_to_end(tmp_path: Path):
    report = engine_bench.main(["--out", str(tmp_path), "--quick", "--sizes", "64"])
    md = (tmp_path / "engine_cpu.md").read_text()
    data = json.loads((tmp_path / "engine_cpu.json").read_text())
    rows = _table_rows(md, "64")
    assert [r[1] for r in rows] == ["seed loop", "seed", "gatys", "default"]
    for r in rows:
        assert re.fullmatch(NUMBER, r[2]) and float(r[2]) > 0, r  # s / iteration
        assert r[3].endswith("x")
    speed = data["speed"]["64"]
    assert all(e["s_per_it"] > 0 and e["error"] is None for e in speed.values())
    ratio = data["ratios"]["s_per_it_speedup"]["64"]["seed"]
    assert ratio == pytest.approx(speed["seed loop"]["s_per_it"] / speed["seed"]["s_per_it"])
    target = data["time_to_target"]
    assert math.isfinite(target["target"]) and target["target"] > 0
    assert target["seed_loop_seconds"] == pytest.approx(6 * speed["seed loop"]["s_per_it"])
    assert f"{target['target']:.4g}" in md and "random:0 (RANDOM weights" in md
    for name in ("seed", "gatys", "default"):
        c = target["contenders"][name]
        assert c["error"] is None and c["curve"], name
        assert c["reached"] == any(v <= target["target"] for _, _, v in c["curve"])
        assert (f"| {name} | yes |" in md) == c["reached"]
    assert "AMD" in md or "Intel" in md or data["machine"]["cpu"] in md
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "engine_cpu_curves.png").exists() == has_mpl
    assert report["weights"]["random"] is True


def test_preset_search_quick_end_to_end(tmp_path: Path):
    engine_bench_target = tmp_path / "seed_target_64px_6steps_random_0.json"
    report = preset_search.main(["--out", str(tmp_path), "--quick"])
    md = (tmp_path / "default_preset_search.md").read_text()
    assert engine_bench_target.exists()  # the target is shared with engine_bench through this file
    names = [r["name"] for r in report["rows"]]
    assert sorted(names) == sorted(preset_search.QUICK_CANDIDATES)
    for row in report["rows"]:
        assert row["error"] is None and row["best_objective"] > 0
        assert f"| {row['name']} | {'yes' if row['reached'] else '**no**'}" in md
        assert (tmp_path / "default_search").is_dir()
    assert len(list((tmp_path / "default_search").glob("*.png"))) == len(names)


def test_gpu_bench_quick_runs_on_cpu(tmp_path: Path):
    report = gpu_bench.main([str(tmp_path), "--device", "cpu", "--quick"])
    md = (tmp_path / "gpu_report.md").read_text()
    rows = _table_rows(md, "64")
    assert [r[1] for r in rows][:3] == ["seed loop", "gatys", "default"]
    speed = report["speed"]["64"]
    for name, e in speed.items():
        assert e["s_per_it"] > 0 and e["flops_per_it"] > 0 and e["error"] is None, name
        assert e["tflops"] == pytest.approx(e["flops_per_it"] / e["s_per_it"] / 1e12)
    assert speed["seed loop"]["flops_per_it"] > 4 * speed["default"]["flops_per_it"]
    runs = report["precision"]["runs"]
    assert set(runs) == {"seed fp32", "gatys fp32", "default fp32"}
    assert all(r["seed_objective"] > 0 for r in runs.values())
    batch = report["batching"]["runs"]
    assert set(batch) == {"1", "2"} and all("error" not in r for r in batch.values()), batch
    assert all(r["s_per_it"] > 0 and r["max_abs_diff_vs_first_run"] <= 2 for r in batch.values())
    assert [r[0] for r in _table_rows(md, "1") + _table_rows(md, "2")] == ["1", "2"]
    assert "RANDOM weights" in md


def test_tiles_bench_measures_one_picture_and_reports() -> None:
    from bench.tiles_bench import one
    from bench.tiles_report import write_tiles_report

    tiled, untiled = one("tiled", 160, 96, 2), one("untiled", 160, 96, 2)
    assert tiled["tiles"] == 4 and untiled["tiles"] == 1
    assert tiled["image"] == untiled["image"] == [160, 106]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in (tiled, untiled))
    md = write_tiles_report({"machine": {}, "memory_and_time": [tiled, untiled],
                             "fleet": [{"workers": 1, "seconds": 4.0, "tiles": 4, "workers_used": 1},
                                       {"workers": 2, "seconds": 2.5, "tiles": 4, "workers_used": 2}]})
    assert "| 160 | tiled | 4 |" in md and "1.60x" in md


def test_tiles_report_shows_the_geometry_rows() -> None:
    from bench.tiles_report import write_tiles_report

    row = {"size": 160, "tile": 112, "overlap": 24, "context": 64, "tile_style": "global", "tiles": 2,
           "untiled": [1.02, 0.054], "tiled": [1.05, 0.059], "content_ratio": 1.03, "style_ratio": 1.1}
    md = write_tiles_report({"machine": {}, "memory_and_time": [], "fleet": [], "geometry": [row]})
    assert "| 160 | 112 / 24 / 64 | global | 2 | 1.02, 0.054 | 1.05, 0.059 | 1.03 | 1.1 |" in md
