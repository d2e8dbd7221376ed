"""The GPU benchmark (issue 5): one H200, under 8 minutes, the repo and torch only.

    python -m bench.gpu_bench OUT_DIR [--device cuda] [--sizes 256,512,1024] [--quick]

(bench/gpu_check.sh wraps it.) Writes OUT_DIR/gpu_report.md and OUT_DIR/gpu_report.json:

1. seconds per iteration at each size for the seed loop, ``gatys`` and ``default`` (interleaved,
   warm-up chunk excluded, median over chunks; cuDNN autotuning happens in the warm-up);
2. memory peak of each (``torch.cuda.max_memory_allocated``, a separate short run each);
3. FLOPs per iteration (bench/flops.py) and achieved TFLOP/s next to the H200's peaks;
4. bf16 autocast against float32: speed and the final seed objective after the same iterations;
5. batching of 1, 2, 4, 8 jobs of 512 px through stylize_batch.

Weights are ``random:0`` unless --weights names a file: there is no network on the GPU machine.
Random weights give real timings and FLOPs; the losses are comparable between runs, the images
are not style transfers. The report says so.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import engine_bench, flops
from bench.harness import (
    EngineContender,
    Objective,
    SeedLoopContender,
    load_inputs,
    machine_info,
    median_or_none,
    run_interleaved,
)
from bench.gpu_report import write_gpu_report
from bench.seed_loop import pil_to_unit
from stylequeue import engine
from stylequeue.engine import BatchItem, StyleConfig, VGGFeatures, preset, stylize_batch
from stylequeue.engine.device import plan_execution
from stylequeue.engine.weights import load_weights

NAMES = ("gatys", "default")
SEED_LOOP = engine_bench.SEED_LOOP
# Peak rates of an H200 SXM (dense, no sparsity): NVIDIA's H200 datasheet gives the H100 SXM's
# figures (BF16 tensor 989 TFLOP/s, TF32 tensor 494, FP32 non-tensor 67). Measured here on an
# H200 (/work/.library/device/KINDS.md, 2026-10-28): an 8192^3 bf16 matmul ran at 788 TFLOP/s.
PEAKS_TFLOPS = {"bf16_dense_datasheet": 989.0, "tf32_dense_datasheet": 494.0,
                "fp32_nontensor_datasheet": 67.0, "bf16_matmul_measured_here": 788.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="256,512,1024")
    p.add_argument("--weights", default="random:0")
    p.add_argument("--chunk", type=int, default=20, help="iterations per timed chunk")
    p.add_argument("--chunks", type=int, default=4, help="timed chunks after one warm-up chunk")
    p.add_argument("--precision-size", type=int, default=512)
    p.add_argument("--precision-iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--quick", action="store_true", help="tiny CPU run for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.chunk, args.chunks = "64", 2, 1
        args.precision_size, args.precision_iters, args.batch_size, args.batches = 64, 4, 64, "1,2"
    args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(cfg: StyleConfig, weights: Any, device: torch.device, models: dict[str, VGGFeatures]) -> VGGFeatures:
    if cfg.pooling not in models:
        models[cfg.pooling] = VGGFeatures.from_weights(weights, pooling=cfg.pooling, device=device)
    return models[cfg.pooling]


def _contender(name: str, size: int, inputs: tuple, weights: Any, device: torch.device,
               models: dict[str, VGGFeatures]) -> Any:
    if name == SEED_LOOP:
        return SeedLoopContender(SEED_LOOP, inputs[0], inputs[1], size, weights.state_dict, device)
    # One scale: the cost of an iteration AT this size (a multi-scale preset mixes sizes).
    cfg = preset(name, size=size, device=str(device), scales=1)
    return EngineContender(name, cfg, inputs[0], inputs[1], _model(cfg, weights, device, models))


def _contenders(size: int, inputs: tuple, weights: Any, device: torch.device,
                models: dict[str, VGGFeatures]) -> list:
    return [_contender(n, size, inputs, weights, device, models) for n in (SEED_LOOP,) + NAMES]


def _image_hw(contender: Any) -> tuple[int, int]:
    if hasattr(contender, "loop"):
        return tuple(contender.loop.content.shape[-2:])
    w, h = contender.content.size
    scale = contender.config.size / max(w, h)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _precision(contender: Any, device: torch.device) -> str:
    """What the run computes in: the engine's plan for its config; the seed loop is float32."""
    if hasattr(contender, "loop"):
        return "fp32 (TF32 convs)" if device.type == "cuda" else "fp32"
    return plan_execution(device, contender.config.precision).precision


def _flops(contender: Any, hw: tuple[int, int]) -> int:
    if hasattr(contender, "loop"):
        return flops.seed_step_flops(*hw)
    cfg = contender.config
    return flops.engine_iteration_flops(*hw, cfg.content_layers, cfg.style_layers)


def speed(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
          models: dict[str, VGGFeatures]) -> dict[str, Any]:
    """Sections 1 and 3: s/it, FLOPs and TFLOP/s per size and contender."""
    out: dict[str, Any] = {}
    for size in args.size_list:
        contenders = _contenders(size, inputs, weights, device, models)
        records = run_interleaved(contenders, every=args.chunk, max_iterations=args.chunk * (args.chunks + 1),
                                  max_seconds=float("inf"), device=device)
        out[str(size)] = {}
        for c, r in zip(contenders, records):
            s_it = median_or_none(r.chunk_seconds_per_iteration(skip=1))
            hw = _image_hw(c)
            n = _flops(c, hw)
            out[str(size)][c.name] = {
                "s_per_it": s_it, "height": hw[0], "width": hw[1], "flops_per_it": n,
                "tflops": (n / s_it / 1e12) if s_it else None,
                "precision": _precision(c, device),
                "error": r.error,
            }
    return out


def memory(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
           models: dict[str, VGGFeatures]) -> dict[str, Any]:
    """Section 2: peak allocated bytes of 3 iterations of each contender alone."""
    out: dict[str, Any] = {}
    for size in args.size_list:
        out[str(size)] = {}
        for name in (SEED_LOOP,) + NAMES:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            error = None
            try:  # built inside the measurement: its own inputs and targets count, not others'
                _contender(name, size, inputs, weights, device, models).run(lambda it, img: False, 3, 3)
            except Exception as exc:  # e.g. out of memory: reported, the benchmark goes on
                error = f"{type(exc).__name__}: {exc}"
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            out[str(size)][name] = {"peak_bytes": peak, "error": error}
    return out


def precision(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
              models: dict[str, VGGFeatures]) -> dict[str, Any]:
    """Section 4: bf16 autocast vs float32 for each preset: s/it and final seed objective."""
    size, iters = args.precision_size, args.precision_iters
    objective = Objective.build(*inputs, size, weights.state_dict, device)
    kinds = ("bf16", "fp32") if device.type == "cuda" else ("fp32",)
    out: dict[str, Any] = {"size": size, "iterations": iters, "runs": {}}
    for name in ("seed",) + NAMES:
        for kind in kinds:
            cfg = preset(name, size=size, iterations=iters, device=str(device), precision=kind,
                         progress_every=iters)
            model = _model(cfg, weights, device, models)
            _sync(device)
            start = time.perf_counter()
            result = engine.stylize(inputs[0], [inputs[1]], cfg, model=model)
            _sync(device)
            seconds = time.perf_counter() - start
            out["runs"][f"{name} {kind}"] = {
                "preset": name, "precision": result.precision, "seconds": seconds,
                "s_per_it": seconds / iters,
                "seed_objective": objective(pil_to_unit(result.image, device)),
                "engine_loss": result.history[-1]["loss"] if result.history else None,
            }
    return out


def batching(args: argparse.Namespace, inputs: tuple, weights: Any, device: torch.device,
             models: dict[str, VGGFeatures]) -> dict[str, Any]:
    """Section 5: 1, 2, 4, 8 jobs of ``--batch-size`` px optimised together (``default`` preset).

    s/iteration of the whole batch from item 0's progress points (set-up and a warm-up chunk
    excluded), image-iterations per second, memory peak, and how far item 0's image is from the
    same job run alone (max |difference| in 8-bit levels).
    """
    warm, n = args.chunk, args.chunk * args.chunks
    cfg = preset("default", size=args.batch_size, iterations=warm + n, device=str(device),
                 progress_every=args.chunk)
    model = _model(cfg, weights, device, models)
    out: dict[str, Any] = {"size": args.batch_size, "preset": "default",
                           "precision": plan_execution(device, cfg.precision).precision,
                           "iterations_timed": n, "runs": {}}
    alone = None
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        stamps: list[tuple[int, float]] = []

        def on_progress(p: Any) -> None:
            _sync(device)
            stamps.append((p.iteration, time.perf_counter()))

        items = [BatchItem(inputs[0], [inputs[1]], callback=on_progress if i == 0 else None) for i in range(b)]
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            results = stylize_batch(items, cfg, model=model)
        except Exception as exc:  # e.g. the API changed or memory ran out: reported, not fatal
            out["runs"][str(b)] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        _sync(device)
        t = dict(stamps)
        s_it = (t[warm + n] - t[warm]) / n if warm in t and warm + n in t else None
        image = torch.from_numpy(np.asarray(results[0].image, dtype=np.int16))
        alone = image if alone is None else alone
        out["runs"][str(b)] = {
            "s_per_it": s_it, "image_its_per_s": (b / s_it) if s_it else None,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "max_abs_diff_vs_first_run": int((image - alone).abs().max()),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run with --device cpu --quick for a smoke test")
    started = time.perf_counter()
    weights, inputs = load_weights(args.weights), load_inputs()
    models: dict[str, VGGFeatures] = {}
    report: dict[str, Any] = {
        "machine": machine_info(device),
        "weights": {"source": args.weights, "random": bool(weights.info.random)},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "peaks_tflops": PEAKS_TFLOPS,
    }
    sections = (("speed", speed), ("memory", memory), ("precision", precision), ("batching", batching))
    for key, fn in sections:
        t0 = time.perf_counter()
        try:
            report[key] = fn(args, inputs, weights, device, models)
        except Exception as exc:  # one broken section must not lose the others' numbers
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        report.setdefault("section_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{key}: {report['section_seconds'][key]} s", flush=True)
        _write(args.out, report)  # after every section: a run cut short still leaves its numbers
    print((args.out / "gpu_report.md").read_text())
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_report.md").write_text(write_gpu_report(report))


if __name__ == "__main__":
    main()
