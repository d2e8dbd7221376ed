"""Search for the ``default`` preset: which settings reach the seed loop's loss fastest.

    python -m bench.preset_search --out bench/results [--size 128] [--max-seconds 90] [--quick]

Every candidate is a StyleConfig; they race interleaved (bench/harness.py) at one size on the
same images and weights, scored by the one common loss (``seed_objective``) every few
iterations, to the seed loop's ``--target-steps``-step value (cached by bench/engine_bench.py).
Writes ``default_preset_search.md`` / ``.json`` and each candidate's last image
(``default_search/<name>.png``) to --out, for a look at the results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench import engine_bench
from bench.harness import (
    Contender,
    EngineContender,
    Objective,
    Record,
    load_average,
    load_inputs,
    machine_info,
    run_interleaved,
)
from stylequeue.engine import StyleConfig, VGGFeatures, preset
from stylequeue.engine.weights import load_weights

RELU_1 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONV_1 = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
# The seed's objective itself, in pixel space: its layers are in effect relu*_1 (see
# bench/seed_loop.py), content weight 1, style weight 100, its Gram scale ("sqrt_chw").
SEED_OBJECTIVE = dict(content_layers=RELU_1, style_layers=RELU_1, content_layer_weights=None,
                      style_layer_weights=None, content_weight=1.0, style_weight=100.0,
                      gram_norm="sqrt_chw", tv_weight=0.0, pooling="max", init="content", scales=1)
PIXEL_ADAM = dict(SEED_OBJECTIVE, space="pixel", optimizer="adam", betas=(0.9, 0.999))

# name -> (preset, overrides): a few settings at a time, so each row answers one question.
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "seed preset (as committed)": ("seed", {}),
    "Adam px lr 0.01": ("default", dict(PIXEL_ADAM, lr=0.01)),
    "Adam px lr 0.03": ("default", dict(PIXEL_ADAM, lr=0.03)),
    "Adam px lr 0.1": ("default", dict(PIXEL_ADAM, lr=0.1)),
    "Adam px lr 0.03, avg pool": ("default", dict(PIXEL_ADAM, lr=0.03, pooling="avg")),
    "Adam px lr 0.03, conv*_1 layers": ("default", dict(PIXEL_ADAM, lr=0.03, content_layers=CONV_1,
                                                         style_layers=CONV_1)),
    "Adam px lr 0.03, EMA 0.9": ("default", dict(PIXEL_ADAM, lr=0.03, ema_decay=0.9)),
    "L-BFGS px": ("default", dict(SEED_OBJECTIVE, space="pixel", optimizer="lbfgs", lr=1.0)),
    "L-BFGS px, avg pool": ("default", dict(SEED_OBJECTIVE, space="pixel", optimizer="lbfgs", lr=1.0,
                                            pooling="avg")),
    "Adam px lr 0.05": ("default", dict(PIXEL_ADAM, lr=0.05)),
    "Adam px lr 0.05, avg pool": ("default", dict(PIXEL_ADAM, lr=0.05, pooling="avg")),
    "Adam px lr 0.1, avg pool": ("default", dict(PIXEL_ADAM, lr=0.1, pooling="avg")),
    "default preset (as committed)": ("default", {}),
}
QUICK_CANDIDATES = ("seed preset (as committed)", "Adam px lr 0.03", "L-BFGS px")
# The first race: one question per row. The budget race (--budget) takes --candidates.
RACE_CANDIDATES = ("seed preset (as committed)", "Adam px lr 0.01", "Adam px lr 0.03", "Adam px lr 0.1",
                   "Adam px lr 0.03, avg pool", "Adam px lr 0.03, conv*_1 layers", "Adam px lr 0.03, EMA 0.9",
                   "L-BFGS px", "default preset (as committed)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--weights", default="random:0")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see engine_bench)")
    p.add_argument("--max-seconds", type=float, default=100.0, help="active seconds per candidate")
    p.add_argument("--target-steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--fresh-target", action="store_true")
    p.add_argument("--budget", action="store_true",
                   help="do not stop at the target: every candidate runs --max-seconds; compare the "
                        "objective reached at 1/4, 1/2 and all of the budget")
    p.add_argument("--candidates", default="", help="';'-separated names from CANDIDATES")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.target_steps, args.eval_every = min(args.size, 64), 6, 2
        args.max_seconds = min(args.max_seconds, 5.0)
    args.target_size = args.size  # the names engine_bench.seed_target reads
    return args


def build(name: str, args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
          models: dict[str, VGGFeatures]) -> EngineContender:
    base, overrides = CANDIDATES[name]
    cfg: StyleConfig = preset(base, **{**overrides, "size": args.size, "device": str(device)})
    if cfg.pooling not in models:
        models[cfg.pooling] = VGGFeatures.from_weights(weights, pooling=cfg.pooling, device=device)
    return _SavingContender(name, cfg, inputs[0], inputs[1], models[cfg.pooling])


class _SavingContender(EngineContender):
    """An EngineContender that keeps its latest image, to be saved for a visual check."""

    last_image: Image.Image | None = None

    def run(self, tick: Any, every: int, max_iterations: int) -> None:
        def keep(iteration: int, image_fn: Any) -> bool:
            image = image_fn()
            self.last_image = Image.fromarray(
                (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
            return tick(iteration, lambda: image)

        super().run(keep, every, max_iterations)


def _objective_at(r: Record, seconds: float) -> float | None:
    """The objective at the last progress point within ``seconds`` of active time."""
    values = [v for _, t, v in r.points if t <= seconds and v is not None]
    return values[-1] if values else None


def summarise(records: list[Record], contenders: list[Contender], target: float,
              seed_seconds: float | None, budget: float) -> list[dict[str, Any]]:
    rows = []
    for r, c in zip(records, contenders):
        hit = r.time_to(target)
        rows.append({
            "name": r.name, "config": c.config.to_dict(),
            "reached": hit is not None, "seconds": hit[0] if hit else None,
            "iterations": hit[1] if hit else None,
            "speedup_vs_seed_loop": (seed_seconds / hit[0]) if hit and seed_seconds else None,
            "best_objective": min((p[2] for p in r.points if p[2] is not None), default=None),
            "ran_seconds": r.points[-1][1] if r.points else None,
            "ran_iterations": r.points[-1][0] if r.points else None,
            "objective_at": {f"{q:g}": _objective_at(r, q * budget) for q in (0.25, 0.5, 1.0)},
            "curve": r.points, "error": r.error,
        })
    return rows


def _seed_loop_speed(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
                     models: dict[str, VGGFeatures]) -> float | None:
    """The seed loop's s/it at this size, interleaved with the seed preset (a short run)."""
    ns = argparse.Namespace(size_list=[args.size], chunk=2 if args.quick else 3,
                            speed_chunks=1 if args.quick else 3)
    speed = engine_bench.measure_speed(ns, inputs, weights, device, models, names=("seed",))
    return speed[str(args.size)][engine_bench.SEED_LOOP]["s_per_it"]


def _f(v: Any, d: int = 4) -> str:
    return "-" if v is None else (f"{v:.{d}g}" if isinstance(v, float) else str(v))


def write_markdown(report: dict[str, Any]) -> str:
    t = report
    budget = t.get("budget")
    how = (f"each for {t['max_seconds']} active s (no early stop), objective read at 1/4, 1/2 and all of it"
           if budget else f"each to the seed objective the seed loop reaches after {t['target_steps']} steps, "
                          f"capped at {t['max_seconds']} active s")
    lines = [
        f"# {'Budget race' if budget else 'Search'} for the `default` preset ({t['size']} px, {t['machine']['device']})",
        "",
        f"Made by `python -m bench.preset_search{' --budget' if budget else ''}`. All candidates raced interleaved",
        f"on the same images and weights ({t['weights']}"
        f"{', RANDOM: only speed and the loss mean anything, not the look' if t['random'] else ''}), {how}.",
        f"Target: {t['target']:.4g} (the seed loop after {t['target_steps']} steps). Seed loop:",
        f"{_f(t['seed_s_per_it'])} s/it here, so {_f(t['seed_seconds'])} s to the target.",
        f"Machine: {t['machine']['cpu']}, torch {t['machine']['torch']}, {t['machine']['torch_threads']} thread(s); "
        f"load average {t['machine']['load_average_at_start']} at start, {t['load_average_at_end']} at end.", "",
    ]
    q = [f"{x:g}" for x in (0.25, 0.5, 1.0)]
    lines += ["| candidate | reached? | s to target | iterations | vs seed loop | best objective | ran (s, it) | "
              + " | ".join(f"objective at {float(x) * t['max_seconds']:.0f} s" for x in q) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(q)]
    key = (lambda r: (r["best_objective"] or 1e9)) if budget else (
        lambda r: (not r["reached"], r["seconds"] or 1e9, r["best_objective"] or 1e9))
    for r in sorted(t["rows"], key=key):
        err = f" ERROR {r['error']}" if r["error"] else ""
        speedup = r["speedup_vs_seed_loop"]
        lines.append(f"| {r['name']} | {'yes' if r['reached'] else '**no**'}{err} | {_f(r['seconds'])} | "
                     f"{_f(r['iterations'])} | {_f(speedup, 3)}{'x' if speedup else ''} | "
                     f"{_f(r['best_objective'])} | {_f(r['ran_seconds'])}, {_f(r['ran_iterations'])} | "
                     + " | ".join(_f(r["objective_at"][x]) for x in q) + " |")
    folder = "default_budget" if budget else "default_search"
    lines += ["", f"Images: `{folder}/*.png` (each candidate's last image).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    weights, inputs = load_weights(args.weights), load_inputs()
    models: dict[str, VGGFeatures] = {}
    info = machine_info(device)
    objective = Objective.build(*inputs, args.size, weights.state_dict, device)
    target = engine_bench.seed_target(args, inputs, weights, device, objective)["target"]
    seed_s_per_it = _seed_loop_speed(args, inputs, weights, device, models)
    names = tuple(n.strip() for n in args.candidates.split(";") if n.strip()) or (
        QUICK_CANDIDATES if args.quick else RACE_CANDIDATES)
    contenders = [build(n, args, inputs, weights, device, models) for n in names]
    started = time.time()
    records = run_interleaved(contenders, every=args.eval_every, max_iterations=100_000,
                              max_seconds=args.max_seconds, device=device, objective=objective,
                              stop_when=None if args.budget else lambda r: r.time_to(target) is not None)
    seed_seconds = args.target_steps * seed_s_per_it if seed_s_per_it else None
    report = {
        "size": args.size, "machine": info, "load_average_at_end": load_average(),
        "weights": args.weights, "random": bool(weights.info.random), "target": target,
        "target_steps": args.target_steps, "max_seconds": args.max_seconds,
        "seed_s_per_it": seed_s_per_it, "seed_seconds": seed_seconds,
        "rows": summarise(records, contenders, target, seed_seconds, args.max_seconds),
        "budget": args.budget,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    images = args.out / ("default_budget" if args.budget else "default_search")
    images.mkdir(exist_ok=True)
    for c in contenders:
        if c.last_image is not None:
            c.last_image.save(images / ("".join(ch if ch.isalnum() else "_" for ch in c.name) + ".png"))
    stem = "default_preset_budget" if args.budget else "default_preset_search"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(write_markdown(report))
    print(write_markdown(report))
    return report


if __name__ == "__main__":
    main()
