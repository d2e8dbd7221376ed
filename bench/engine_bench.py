"""Engine against the seed's loop, side by side in one run: speed per iteration and time to a target.

    python -m bench.engine_bench --out bench/results [--device cpu|cuda] [--sizes 128,256] [--quick]

(a) seconds per iteration at each size for the faithful seed loop (bench/seed_loop.py) and the
    engine's presets (warm-up chunk excluded, median over chunks);
(b) the active seconds each preset needs to reach the seed objective's value that the seed loop
    reaches after ``--target-steps`` (500) steps at the smallest size, capped at ``--max-seconds``;
(c) objective-vs-seconds curves for all of them (PNG when matplotlib is installed).

Writes ``engine_<device>.md``, ``engine_<device>.json`` and ``engine_<device>_curves.png`` to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    Contender,
    EngineContender,
    Objective,
    Record,
    SeedLoopContender,
    load_average,
    load_inputs,
    machine_info,
    median_or_none,
    run_interleaved,
)
from bench.report import plot_curves, write_engine_report
from bench.seed_loop import SeedLoop
from stylequeue.engine import VGGFeatures, preset
from stylequeue.engine.weights import load_weights

PRESET_NAMES = ("seed", "gatys", "default")
SEED_LOOP = "seed loop"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sizes", default="128,256", help="longest sides for seconds per iteration")
    p.add_argument("--weights", default="random:0", help="VGG19 weights source (default random:0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads than free "
                        "cores make OpenMP spin, 4x slower here; 0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--speed-chunks", type=int, default=6, help="timed chunks per contender and size")
    p.add_argument("--chunk", type=int, default=5, help="iterations per chunk (speed)")
    p.add_argument("--target-steps", type=int, default=500, help="seed loop steps that set the target")
    p.add_argument("--target-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=10, help="iterations between objective evaluations")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="cap on each preset's active seconds in (b) (also capped at the seed loop's time)")
    p.add_argument("--fresh-target", action="store_true", help="recompute the cached seed-loop target")
    args = p.parse_args(argv)
    if args.quick:
        args.speed_chunks, args.chunk = 1, 2
        args.target_steps, args.eval_every = 6, 2
        args.target_size = min(args.target_size, 64)
    sizes = {int(s) for s in args.sizes.split(",") if s.strip()}
    args.size_list = sorted(sizes | {args.target_size})  # (b) needs the seed loop's speed there
    return args


def _contenders(names: tuple[str, ...], size: int, content: Any, style: Any, weights: Any,
                device: torch.device, models: dict[str, VGGFeatures], *, single_scale: bool = False
                ) -> list[Contender]:
    """Seed loop first, then the presets at ``size``, all on ``device``.

    ``single_scale`` runs a multi-scale preset at ``size`` only: the cost of an iteration there.
    """
    out: list[Contender] = [SeedLoopContender(SEED_LOOP, content, style, size, weights.state_dict, device)]
    for name in names:
        cfg = preset(name, size=size, device=str(device), progress_every=1)
        if single_scale:
            cfg = cfg.replace(scales=1)
        if cfg.pooling not in models:
            models[cfg.pooling] = VGGFeatures.from_weights(weights, pooling=cfg.pooling, device=device)
        out.append(EngineContender(name, cfg, content, style, models[cfg.pooling]))
    return out


def measure_speed(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
                  models: dict[str, VGGFeatures], names: tuple[str, ...] = PRESET_NAMES
                  ) -> dict[str, dict[str, Any]]:
    """(a): {size: {contender: {s_per_it, chunks_s_per_it, error}}}, seed loop and ``names``."""
    result: dict[str, dict[str, Any]] = {}
    for size in args.size_list:
        contenders = _contenders(names, size, *inputs, weights, device, models, single_scale=True)
        records = run_interleaved(
            contenders, every=args.chunk, max_iterations=args.chunk * (args.speed_chunks + 1),
            max_seconds=float("inf"), device=device,
        )
        result[str(size)] = {r.name: _speed_entry(r) for r in records}
    return result


def _speed_entry(r: Record) -> dict[str, Any]:
    chunks = r.chunk_seconds_per_iteration(skip=1)
    return {"s_per_it": median_or_none(chunks), "chunks_s_per_it": chunks, "error": r.error}


def seed_target(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
                objective: Objective) -> dict[str, Any]:
    """The seed objective along the seed loop's first ``target_steps`` steps (cached in --out).

    Computed with ``SeedLoop(shortcut=True)``: the same trajectory without the seed's waste (see
    bench/seed_loop.py), so a slow CPU can afford 500 steps; its time is NOT the seed loop's.
    """
    key = {"size": args.target_size, "steps": args.target_steps,
           "weights": args.weights, "device": device.type, "torch": torch.__version__}
    path = args.out / f"seed_target_{args.target_size}px_{args.target_steps}steps_{_slug(args.weights)}.json"
    if path.exists() and not args.fresh_target:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    loop = SeedLoop(inputs[0], inputs[1], weights.state_dict, max_size=args.target_size,
                    device=device, shortcut=True)
    curve: list[tuple[int, float]] = [(0, objective(loop.image()))]
    loop.run(args.target_steps, lambda step, lp: curve.append((step, objective(lp.image()))) and False,
             every=args.eval_every)
    result = {"key": key, "every": args.eval_every, "target": curve[-1][1], "curve": curve}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def measure_time_to_target(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
                           models: dict[str, VGGFeatures], seed_s_per_it: float | None) -> dict[str, Any]:
    """(b) and (c): the presets race (interleaved) to the seed loop's ``target_steps``-step loss.

    The seed loop's own time to it is ``target_steps`` x its seconds per iteration measured in (a)
    at the same size, in the same run. Each preset is capped at that time (slower than the seed
    loop counts as "not reached") and at --max-seconds.
    """
    size = args.target_size
    objective = Objective.build(*inputs, size, weights.state_dict, device)
    reference = seed_target(args, inputs, weights, device, objective)
    target = reference["target"]
    seed_seconds = args.target_steps * seed_s_per_it if seed_s_per_it else None
    cap = min(args.max_seconds, seed_seconds) if seed_seconds else args.max_seconds
    contenders = _contenders(PRESET_NAMES, size, *inputs, weights, device, models)[1:]
    records = run_interleaved(
        contenders, every=args.eval_every, max_iterations=100_000, max_seconds=cap,
        device=device, objective=objective, stop_when=lambda r: r.time_to(target) is not None,
    )
    seed_record = Record(SEED_LOOP, [(step, step * (seed_s_per_it or 0.0), value)
                                     for step, value in reference["curve"]])
    summary = _target_summary([seed_record] + records, target, args)
    summary.update(seed_loop_seconds=seed_seconds, seed_s_per_it=seed_s_per_it, cap_seconds=cap)
    return summary


def _target_summary(records: list[Record], target: float | None, args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "size": args.target_size, "target_steps": args.target_steps, "target": target,
        "contenders": {},
    }
    for r in records:
        hit = r.time_to(target) if target is not None else None
        summary["contenders"][r.name] = {
            "reached": hit is not None,
            "seconds": hit[0] if hit else None,
            "iterations": hit[1] if hit else None,
            "ran_seconds": r.points[-1][1] if r.points else None,
            "ran_iterations": r.points[-1][0] if r.points else None,
            "best_objective": min((p[2] for p in r.points if p[2] is not None), default=None),
            "curve": r.points,
            "error": r.error,
        }
    return summary


def ratios(speed: dict[str, dict[str, Any]], target: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios: seed loop / contender (above 1 means the contender is faster)."""
    out: dict[str, Any] = {"s_per_it_speedup": {}, "time_to_target_speedup": {}}
    for size, entries in speed.items():
        base = entries.get(SEED_LOOP, {}).get("s_per_it")
        out["s_per_it_speedup"][size] = {
            name: (base / e["s_per_it"]) if base and e.get("s_per_it") else None
            for name, e in entries.items() if name != SEED_LOOP
        }
    base_t = target["contenders"].get(SEED_LOOP, {}).get("seconds")
    out["time_to_target_speedup"] = {
        name: (base_t / c["seconds"]) if base_t and c["seconds"] else None
        for name, c in target["contenders"].items() if name != SEED_LOOP
    }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    weights = load_weights(args.weights)
    inputs = load_inputs()
    models: dict[str, VGGFeatures] = {}
    info = machine_info(device)
    started = time.time()
    speed = measure_speed(args, inputs, weights, device, models)
    seed_s_per_it = speed[str(args.target_size)][SEED_LOOP]["s_per_it"]
    target = measure_time_to_target(args, inputs, weights, device, models, seed_s_per_it)
    report: dict[str, Any] = {
        "machine": {**info, "load_average_at_end": load_average()},
        "weights": {"source": args.weights, "random": bool(weights.info.random)},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "presets": {name: preset(name).to_dict() for name in PRESET_NAMES},
        "speed": speed,
        "time_to_target": target,
        "ratios": ratios(speed, target),
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{device.type}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    plot = plot_curves(target, args.out / f"{stem}_curves.png")
    report["plot"] = str(plot.name) if plot else None
    (args.out / f"{stem}.md").write_text(write_engine_report(report))
    print((args.out / f"{stem}.md").read_text())
    return report


if __name__ == "__main__":
    main()
