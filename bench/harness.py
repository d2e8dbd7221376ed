"""Shared benchmark machinery: contenders, fair interleaved timing, the common objective, machine info.

Fairness rules every benchmark here follows:

* Same images, same weights, same device for every contender, in one process.
* Contenders run INTERLEAVED: each runs in its own thread, but only one computes at a time; at
  each progress point it hands the turn to the next (A B C A B C ...). Load from other processes
  on a shared machine then hits every contender alike.
* Each contender's clock runs only while it computes; the time spent evaluating the common
  objective (``seed_objective``) at progress points, and waiting for its turn, is excluded.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from bench.seed_loop import SeedLoop, SeedVGG, pil_to_unit, quantize, seed_objective
from stylequeue.engine import StyleConfig, VGGFeatures, stylize
from stylequeue.engine.images import load_image, resize_longest
from stylequeue.engine.network import VGG19, Network

REPO = Path(__file__).resolve().parent.parent
CONTENT_PATH = REPO / "examples" / "content" / "chelsea.jpg"
STYLE_PATH = REPO / "examples" / "style" / "starry_night.jpg"
MAX_PIXELS = 50_000_000

# tick(iteration, image_fn) -> True to stop; image_fn() gives (1, 3, H, W) RGB in [0, 1].
Tick = Callable[[int, Callable[[], torch.Tensor]], bool]


def load_inputs() -> tuple[Image.Image, Image.Image]:
    """The benchmark's content and style images, decoded the way the engine decodes them."""
    return (
        load_image(CONTENT_PATH, max_pixels=MAX_PIXELS),
        load_image(STYLE_PATH, max_pixels=MAX_PIXELS),
    )


@dataclass
class Objective:
    """``seed_objective`` bound to one size: content and style (at the content's shape) fixed."""

    content: torch.Tensor  # (1, 3, H, W) in [0, 1]
    style: torch.Tensor  # (1, 3, H, W) in [0, 1], the style resized to the content's real shape
    model: SeedVGG

    @classmethod
    def build(cls, content_img: Image.Image, style_img: Image.Image, size: int,
              state_dict: dict[str, torch.Tensor], device: torch.device) -> "Objective":
        content = resize_longest(content_img, size)
        style = style_img.resize(content.size, Image.Resampling.LANCZOS)
        return cls(pil_to_unit(content, device), pil_to_unit(style, device),
                   SeedVGG(state_dict).to(device).eval())

    def __call__(self, image: torch.Tensor) -> float:
        """The seed's loss of ``image`` rounded to 8 bits (what a user would get).

        The seed truncates sizes where the engine rounds (64 px: 64x42 against 64x43); an image
        off by such a pixel is resized to the content's shape first (never at 128 or 256 px).
        """
        image = image.to(self.content.device).float()
        if image.shape[-2:] != self.content.shape[-2:]:
            image = F.interpolate(image, size=self.content.shape[-2:], mode="bicubic",
                                  align_corners=False, antialias=True)
        return seed_objective(quantize(image), self.content, self.style, self.model)


class Contender:
    """Something that optimises an image and calls ``tick`` every ``every`` iterations."""

    name: str

    def run(self, tick: Tick, every: int, max_iterations: int) -> None:
        raise NotImplementedError


class SeedLoopContender(Contender):
    """The faithful re-creation of the seed's loop."""

    def __init__(self, name: str, content: Image.Image, style: Image.Image, size: int,
                 state_dict: dict[str, torch.Tensor], device: torch.device, network: Network = VGG19) -> None:
        self.name = name
        # Built here, outside the timed run, as the engine's model is: single use.
        self.loop = SeedLoop(content, style, state_dict, max_size=size, device=device, network=network)

    def run(self, tick: Tick, every: int, max_iterations: int) -> None:
        loop = self.loop
        while loop.steps_done < max_iterations:
            for _ in range(every):
                loss = loop.step()
            loss.item()  # the seed logs a loss every 10 steps: a host sync, as the engine's
            if tick(loop.steps_done, loop.image):
                return


class EngineContender(Contender):
    """``stylize()`` under one StyleConfig."""

    def __init__(self, name: str, config: StyleConfig, content: Image.Image, style: Image.Image,
                 model: VGGFeatures) -> None:
        self.name = name
        self.config = config
        self.content, self.style, self.model = content, style, model

    def run(self, tick: Tick, every: int, max_iterations: int) -> None:
        iterations = max(1, -(-max_iterations // self.config.scales))  # per scale
        cfg = self.config.replace(progress_every=every, iterations=iterations)
        stop = threading.Event()

        def on_progress(p: Any) -> None:
            if stop.is_set():
                return  # the final report after a stop
            if tick(p.iteration, lambda: pil_to_unit(p.preview())):
                stop.set()

        stylize(self.content, [self.style], cfg, model=self.model, callback=on_progress,
                should_stop=stop.is_set)


@dataclass
class Record:
    """What one contender did: (iteration, active seconds, objective or None) per progress point.

    The objective is whatever the run's ``objective`` returns: one loss, or (bench/quality.py) a
    pair of distances.
    """

    name: str
    points: list[tuple[int, float, Any]] = field(default_factory=list)
    error: str | None = None

    def chunk_seconds_per_iteration(self, skip: int = 1) -> list[float]:
        """Seconds per iteration of each chunk between progress points, the first ``skip`` dropped."""
        out = []
        prev_it, prev_t = 0, 0.0
        for i, (it, t, _) in enumerate(self.points):
            if i >= skip and it > prev_it:
                out.append((t - prev_t) / (it - prev_it))
            prev_it, prev_t = it, t
        return out

    def time_to(self, target: float) -> tuple[float, int] | None:
        """(active seconds, iteration) at the first progress point whose objective <= target."""
        for it, t, obj in self.points:
            if obj is not None and obj <= target:
                return t, it
        return None


class Interleaver:
    """Runs contenders in threads, one at a time, passing the turn round robin at progress points."""

    def __init__(self, n: int) -> None:
        self._cond = threading.Condition()
        self._alive = [True] * n
        self._turn = 0

    def wait_turn(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == i)

    def _advance(self, i: int) -> None:
        n = len(self._alive)
        for step in range(1, n + 1):
            j = (i + step) % n
            if self._alive[j]:
                self._turn = j
                break
        self._cond.notify_all()

    def pass_turn(self, i: int) -> None:
        with self._cond:
            self._advance(i)
            self._cond.wait_for(lambda: self._turn == i)

    def finish(self, i: int) -> None:
        with self._cond:
            self._alive[i] = False
            self._advance(i)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(
    contenders: list[Contender],
    *,
    every: int,
    max_iterations: int,
    max_seconds: float,
    device: torch.device,
    objective: Callable[[torch.Tensor], Any] | None = None,
    stop_when: Callable[[Record], bool] | None = None,
) -> list[Record]:
    """Run ``contenders`` interleaved (see the module docstring); one Record each.

    Each stops at ``max_iterations``, after ``max_seconds`` of its own active time, or when
    ``stop_when(record)`` says so (checked at its progress points). If the first contender (the
    reference, whose result the others are judged by) fails, the others stop at their next point.
    """
    records = [Record(c.name) for c in contenders]
    inter = Interleaver(len(contenders))
    reference_failed = threading.Event()

    def work(i: int) -> None:
        record, active, started = records[i], 0.0, 0.0

        def tick(iteration: int, image_fn: Callable[[], torch.Tensor]) -> bool:
            nonlocal active, started
            _sync(device)
            active += time.perf_counter() - started
            value = objective(image_fn()) if objective is not None else None
            record.points.append((iteration, active, value))
            done = (active >= max_seconds or reference_failed.is_set()
                    or (stop_when is not None and stop_when(record)))
            inter.pass_turn(i)
            started = time.perf_counter()
            return done

        inter.wait_turn(i)
        try:
            started = time.perf_counter()
            contenders[i].run(tick, every, max_iterations)
        except Exception as exc:  # a failing contender is reported, not allowed to hang the others
            record.error = f"{type(exc).__name__}: {exc}"
            if i == 0:
                reference_failed.set()
        finally:
            inter.finish(i)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info
