"""Markdown for bench/gpu_bench.py's report."""

from __future__ import annotations

from typing import Any


_NOT_RUN = {"error": "not run (the run ended before this section)"}


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _speed_lines(speed: dict[str, Any], peaks: dict[str, float]) -> list[str]:
    if "error" in speed:
        return [f"ERROR: {speed['error']}"]
    bf16 = peaks["bf16_dense_datasheet"]
    lines = ["| size | contender | image (H x W) | precision | s / iteration | vs seed loop | "
             "GFLOP / it | TFLOP/s | share of bf16 peak (989) |", "|---|---|---|---|---|---|---|---|---|"]
    for size, entries in speed.items():
        base = entries.get("seed loop", {}).get("s_per_it")
        for name, e in entries.items():
            ratio = (base / e["s_per_it"]) if base and e["s_per_it"] else None
            share = (e["tflops"] / bf16) if e["tflops"] else None
            err = f" ERROR {e['error']}" if e.get("error") else ""
            lines.append(
                f"| {size} | {name}{err} | {e['height']} x {e['width']} | {e['precision']} | {_f(e['s_per_it'])} | "
                f"{_f(ratio, 3)}{'x' if ratio else ''} | {e['flops_per_it'] / 1e9:.1f} | {_f(e['tflops'], 3)} | "
                f"{_f(share * 100, 3) + ' %' if share else '-'} |")
    return lines


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    if "error" in memory:
        return [f"ERROR: {memory['error']}"]
    lines = ["| size | contender | peak allocated (MiB) |", "|---|---|---|"]
    for size, entries in memory.items():
        for name, e in entries.items():
            peak = f"{e['peak_bytes'] / 2**20:.0f}" if e["peak_bytes"] is not None else "- (not CUDA)"
            lines.append(f"| {size} | {name} | {peak}{' ERROR ' + e['error'] if e['error'] else ''} |")
    return lines


def _precision_lines(prec: dict[str, Any]) -> list[str]:
    if "error" in prec:
        return [f"ERROR: {prec['error']}"]
    lines = [f"{prec['iterations']} iterations at {prec['size']} px, each run alone (cuDNN autotuning",
             "included in its time). Seed objective of the final image (8-bit), lower is better.", "",
             "| run | precision | s / iteration | seed objective | engine's own loss |", "|---|---|---|---|---|"]
    for name, r in prec["runs"].items():
        lines.append(f"| {name} | {r['precision']} | {_f(r['s_per_it'])} | {_f(r['seed_objective'], 6)} | "
                     f"{_f(r['engine_loss'], 6)} |")
    return lines


def _batch_lines(b: dict[str, Any]) -> list[str]:
    if b.get("error"):
        return [f"**failed**: {b['error']}"]
    lines = [f"`stylize_batch` of B identical `{b['preset']}` jobs at {b['size']} px ({b['precision']}),",
             f"{b['iterations_timed']} timed iterations after a warm-up chunk. 'gain' = image-iterations per",
             "second against B = 1. 'diff' = max |item 0 - the B = 1 image| in 8-bit levels.", "",
             "| B | s / batch iteration | image-iterations / s | gain | peak MiB | diff |",
             "|---|---|---|---|---|---|"]
    base = b["runs"].get("1", {}).get("image_its_per_s")
    for size, r in b["runs"].items():
        if "error" in r:
            lines.append(f"| {size} | ERROR {r['error']} | | | | |")
            continue
        gain = (r["image_its_per_s"] / base) if base and r["image_its_per_s"] else None
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        lines.append(f"| {size} | {_f(r['s_per_it'])} | {_f(r['image_its_per_s'])} | {_f(gain, 3)} | {peak} | "
                     f"{r['max_abs_diff_vs_first_run']} |")
    return lines


def write_gpu_report(report: dict[str, Any]) -> str:
    m, peaks = report["machine"], report["peaks_tflops"]
    lines = [
        f"# GPU benchmark: {m.get('gpu', m['device'])}", "",
        f"torch {m['torch']}, CUDA {m.get('cuda', '-')}, {m['cpu']}. Weights: {report['weights']['source']}"
        + (" -- RANDOM weights (no network on the GPU machine): timings, memory and FLOPs are real; "
           "losses compare runs with each other only; the images are not style transfers."
           if report["weights"]["random"] else ""),
        f"Whole run: {report['wall_seconds']} s (sections: {report.get('section_seconds')}).", "",
        "## Seconds per iteration, FLOPs and TFLOP/s", "",
        "Contenders interleaved per size (chunks of iterations in turn), warm-up chunk excluded, median",
        "of the rest. The seed loop runs float32 (cuDNN's default TF32 convolutions); the presets run",
        "their default CUDA precision (bf16 autocast). FLOPs are counted from the conv shapes (see",
        "bench/flops.py): engine iteration = 2 x forward FLOPs of VGG19 cut at the deepest layer used",
        "(forward + input-gradient backward; weights frozen) + Gram products; seed step = 3 full",
        "forwards + input- and weight-gradient backward of 3 passes + Grams.",
        f"Peaks (dense): bf16 {peaks['bf16_dense_datasheet']}, TF32 {peaks['tf32_dense_datasheet']},",
        f"fp32 non-tensor {peaks['fp32_nontensor_datasheet']} TFLOP/s (NVIDIA H100/H200 SXM datasheet);",
        f"a bf16 8192^3 matmul measured {peaks['bf16_matmul_measured_here']} TFLOP/s on this kind of machine.", "",
    ]
    lines += _speed_lines(report.get("speed", _NOT_RUN), peaks) + [""]
    lines += ["## Memory peaks", "", "torch.cuda.max_memory_allocated over 3 iterations of each run alone,",
              "including the resident VGG weights (~80 MB per pooling kind).", ""]
    lines += _memory_lines(report.get("memory", _NOT_RUN)) + [""]
    lines += ["## bf16 autocast against float32", ""] + _precision_lines(report.get("precision", _NOT_RUN)) + [""]
    lines += ["## Batching", ""] + _batch_lines(report.get("batching", _NOT_RUN)) + [""]
    return "\n".join(lines)
