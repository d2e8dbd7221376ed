"""``stylequeue run CONTENT STYLE [STYLE ...] -o OUT``: one style transfer on this machine.

Every engine option defaults to ``None`` here: only what the user sets is passed to
``preset(name, **overrides)``, so the defaults stay written once, in StyleConfig and the presets.

Writes OUT (PNG, JPEG or WebP by its extension) and ``OUT.json`` beside it (``out.png`` ->
``out.png.json``): the full config, loss history, timings, device, weights (source, sha256,
``random_weights``), library versions and the input files. Ctrl-C stops at the next iteration and
still writes the partial result, marked ``"stopped": true``; a second Ctrl-C aborts.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stylequeue import __version__
from stylequeue.exceptions import ConfigError, StyleQueueError

if TYPE_CHECKING:
    from stylequeue.engine import StyleConfig
    from stylequeue.settings import Settings

# argparse dest -> StyleConfig field, for the options passed straight through as overrides.
_PASSTHROUGH = {
    "size": "size",
    "iterations": "iterations",
    "optimizer": "optimizer",
    "lr": "lr",
    "seed": "seed",
    "content_weight": "content_weight",
    "style_weight": "style_weight",
    "tv_weight": "tv_weight",
    "style_blend": "style_blend_weights",
    "style_scale": "style_scale",
    "original_colors": "original_colors",
    "pooling": "pooling",
    "network": "network",
    "loss_norm": "loss_norm",
    "style_loss": "style_loss",
    "scales": "scales",
    "min_size": "min_size",
    "tile_size": "tile_size",
    "tile_overlap": "tile_overlap",
    "tile_passes": "tile_passes",
    "tile_context": "tile_context",
    "tile_style": "tile_style",
    "progress_every": "progress_every",
    "device": "device",
}
INIT_KEYWORDS = ("content", "noise")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="stylise one image locally",
        description="Stylise CONTENT with one or more STYLE images and write OUT and OUT.json. "
        "Options left out take the preset's value.",
    )
    engine = add_picture_options(p, "engine options (default: the preset's value)")
    engine.add_argument("--init", metavar="content|noise|PATH", help="starting image")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--weights",
        help="imagenet, a file path, s3://bucket/key or random[:SEED] (default: settings)",
    )
    io.add_argument("--weights-sha256", help="refuse weights whose file has another sha256")
    io.add_argument("--weights-convention", help="torchvision or caffe: the input the weights expect "
                    "(default: what the file records, else torchvision)")
    io.add_argument(
        "--max-pixels", type=int, help="largest input/output in pixels (default: settings)"
    )
    io.add_argument(
        "--save-every", type=int, metavar="N", help="also write OUT-stem_iterNNNN.ext every N steps"
    )
    io.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_command)


def add_picture_options(p: argparse.ArgumentParser, engine_title: str) -> argparse._ArgumentGroup:
    """CONTENT STYLE... -o OUT --preset and the engine options (:data:`_PASSTHROUGH`), which
    ``stylequeue demo`` shares (sending them as a job's params), so ``scripts/demo.sh`` takes the
    same options with or without ``--local``. Returns the engine options' group."""
    p.add_argument("content", metavar="CONTENT", help="content image (PNG, JPEG, WebP, ...)")
    p.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .png/.jpg/.webp")
    p.add_argument("--preset", help="seed, gatys or default (default: default)")
    engine = p.add_argument_group(engine_title)
    engine.add_argument("--size", type=int, help="longest side of the output, pixels")
    engine.add_argument("--iterations", type=int, help="optimiser steps per scale")
    engine.add_argument("--optimizer", help="adam or lbfgs")
    engine.add_argument("--lr", type=float, help="learning rate")
    engine.add_argument("--seed", type=int, help="random seed (a CPU run repeats exactly)")
    engine.add_argument("--content-weight", type=float)
    engine.add_argument("--style-weight", type=float)
    engine.add_argument("--tv-weight", type=float, help="total variation weight")
    engine.add_argument(
        "--style-blend", type=float, nargs="+", metavar="W", help="one blend weight per style"
    )
    engine.add_argument("--style-scale", type=float, help="style size relative to the output")
    engine.add_argument(
        "--original-colors",
        action=argparse.BooleanOptionalAction,
        help="keep the content's colours (luminance-only transfer)",
    )
    engine.add_argument("--pooling", help="max or avg")
    engine.add_argument("--style-loss", help="gram (Gatys et al.) or wasserstein (means and covariances)")
    engine.add_argument("--loss-norm", help="none (plain MSE) or relative (each term over its target's "
                        "mean square: weights mean the same on any network)")
    engine.add_argument("--network", help="vgg19 or vgg16 (default: the weights' network)")
    engine.add_argument("--scales", type=int, help="number of coarse-to-fine sizes")
    engine.add_argument("--min-size", type=int, help="longest side of the coarsest scale")
    engine.add_argument("--tile-size", type=int, help="run the final scale as overlapping tiles of at "
                        "most this many px a side (print sizes past what the device holds)")
    engine.add_argument("--tile-overlap", type=int, help="pixels neighbouring tiles share (default 64)")
    engine.add_argument("--tile-passes", type=int, help="1, or 2: a second pass over a grid shifted "
                        "by half a tile")
    engine.add_argument("--tile-context", type=int, help="pixels of the picture around each tile that VGG "
                        "sees while the tile is optimised (default 64)")
    engine.add_argument("--tile-style", choices=("regional", "global"), help="regional (default): tiles match "
                        "the style together, as one picture; global: each tile matches it alone")
    engine.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: settings)")
    engine.add_argument("--progress-every", type=int, metavar="N", help="report every N steps")
    return engine


def run_command(args: argparse.Namespace) -> int:
    """Load inputs, stylise, write OUT and OUT.json; see the module docstring."""
    import torch

    from stylequeue.engine import stylize
    from stylequeue.engine.tiled import stylize_tiled
    from stylequeue.engine.images import format_for_path, save_image
    from stylequeue.worker.resources import resources_for

    started = time.perf_counter()
    out = Path(args.output)
    format_for_path(out)  # an unknown extension fails now, not after the whole run
    settings = _settings(args)
    config, init_path = _config(args, settings.device)
    content, styles, init_image = _load_inputs(args, init_path, config, settings.max_pixels)
    images_s = time.perf_counter() - started
    model = resources_for(settings).model(config.pooling, device=config.device)
    if args.network is None:
        config = config.replace(network=model.network.name)
    weights_info = model.info
    setup_s = time.perf_counter() - started

    stop = _StopFlag()
    with ProgressBar(config.total_iterations, quiet=args.quiet) as bar, stop.installed():
        callback = _callback(bar, out, args.save_every, settings.max_pixels, save_image)
        try:
            if config.tile_size:
                if init_image is not None:
                    raise ConfigError("--init PATH and --tile-size together are not supported; use one")
                result = stylize_tiled(content, styles, config, model=model, callback=callback, should_stop=stop)
            else:
                result = stylize(
                    content, styles, config, model=model, init_image=init_image,
                    callback=callback, should_stop=stop,
                )  # fmt: skip
        except torch.OutOfMemoryError:
            raise StyleQueueError(
                f"out of device memory at size {config.size} on {config.device}: lower --size, "
                "use fewer --scales or another --device"
            ) from None
    save_image(result.image, out, max_pixels=settings.max_pixels)

    meta = result.metadata()
    meta["weights"] = weights_info.to_dict()
    meta["random_weights"] = weights_info.random
    meta["inputs"] = {"content": args.content, "styles": list(args.styles), "init": init_path}
    meta["output"] = str(out)
    meta["stylequeue_version"] = __version__
    meta["timings"] = {
        **meta.get("timings", {}),
        "load_images_s": images_s,
        "setup_s": setup_s,  # images, weights and model
        "command_s": time.perf_counter() - started,  # from parsed arguments to OUT written
    }
    _write_json(metadata_path(out), meta)
    _report(args, out, result, weights_info.random)
    return 130 if result.stopped else 0


def _settings(args: argparse.Namespace) -> "Settings":
    from stylequeue.settings import load_settings

    return load_settings(
        {
            "weights": args.weights,
            "weights_sha256": args.weights_sha256,
            "weights_convention": args.weights_convention,
            "max_pixels": args.max_pixels,
            "device": args.device,
        }
    )


def _config(args: argparse.Namespace, device: str) -> tuple["StyleConfig", str | None]:
    """The preset with the user's overrides -> (config, initial image path or None)."""
    from stylequeue.engine import preset

    overrides = _overrides(args, device)
    init_path = None
    if args.init is not None:
        overrides["init"] = args.init if args.init in INIT_KEYWORDS else "image"
        init_path = None if args.init in INIT_KEYWORDS else args.init
    config = preset(args.preset or "default", **overrides)
    if args.save_every:
        # Previews can only be taken in the progress callback: make it fire on every multiple of
        # save_every as well (progress_every never changes the result).
        config = config.replace(progress_every=math.gcd(config.progress_every, args.save_every))
    return config, init_path


def _load_inputs(
    args: argparse.Namespace, init_path: str | None, config: "StyleConfig", max_pixels: int
) -> tuple[Any, list[Any], Any]:
    from stylequeue.engine.images import check_output_pixels, fit_longest, load_image

    def load(path: str) -> Any:
        return load_image(path, max_pixels=max_pixels)

    content, styles = load(args.content), [load(s) for s in args.styles]
    init_image = load(init_path) if init_path else None
    # Refuse an output past the limit now, not after the whole optimisation.
    check_output_pixels(fit_longest(content.size, config.size), max_pixels)
    return content, styles, init_image


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The StyleConfig fields of the engine options the user set; the preset fills in the rest."""
    return {field: getattr(args, dest) for dest, field in _PASSTHROUGH.items() if getattr(args, dest) is not None}


def _overrides(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Only the options the user set (plus the settings' device)."""
    overrides = engine_overrides(args)
    overrides.setdefault("device", device)
    if args.save_every is not None and args.save_every < 1:
        raise ConfigError(f"--save-every must be at least 1, got {args.save_every}")
    return overrides


def metadata_path(out: Path) -> Path:
    """``out.png`` -> ``out.png.json``: the whole name, so out.png and out.jpg never share one."""
    return out.with_name(out.name + ".json")


def preview_path(out: Path, iteration: int) -> Path:
    """``out.png`` at step 40 -> ``out_iter0040.png``."""
    return out.with_name(f"{out.stem}_iter{iteration:04d}{out.suffix}")


def _callback(
    bar: "ProgressBar",
    out: Path,
    save_every: int | None,
    max_pixels: int,
    save_image: Callable[..., Path],
) -> Callable[[Any], None]:
    def on_progress(progress: Any) -> None:
        bar.update(progress)
        it = progress.iteration
        if save_every and it % save_every == 0 and 0 < it < progress.total:
            save_image(progress.preview(), preview_path(out, it), max_pixels=max_pixels)

    return on_progress


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from stylequeue.fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str, allow_nan=False) + "\n").encode())


def warn_random_weights() -> None:
    """Said on every console that shows such a result (``run``, ``demo``), as the metadata says it."""
    print(
        "stylequeue: WARNING: made with RANDOM VGG19 weights: this is not a real style "
        "transfer (see \"random_weights\": true in the metadata)",
        file=sys.stderr,
    )


def _report(args: argparse.Namespace, out: Path, result: Any, random_weights: bool) -> None:
    if random_weights:
        warn_random_weights()
    if result.stopped:
        print(f"stylequeue: stopped early; wrote the partial result to {out}", file=sys.stderr)
    elif not args.quiet:
        width, height = result.image.size
        print(f"wrote {out} ({width}x{height}) and {metadata_path(out)}", file=sys.stderr)


class _StopFlag:
    """``should_stop`` for the engine: the first Ctrl-C sets it, a second one aborts."""

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self) -> bool:
        return self.stopped

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        print("\nstylequeue: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def installed(self) -> "SignalScope":
        return SignalScope(self._on_sigint)


class SignalScope:
    """``handler`` for ``signals`` inside the ``with``, the previous handlers after it."""

    def __init__(self, handler: Callable[[int, Any], None], signals: tuple[int, ...] = (signal.SIGINT,)) -> None:
        self.handler = handler
        self.signals = signals
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        # Signal handlers can only be set from the main thread (main() may run elsewhere in tests).
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handler) for sig in self.signals}

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


class ProgressBar:
    """tqdm fed by the engine's Progress (``run``) or a job's PROGRESS meta (``demo``): iteration,
    loss, it/s and ETA. The engine never sees tqdm."""

    def __init__(self, total: int | None, *, quiet: bool = False, desc: str | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="it", disable=quiet, file=sys.stderr, dynamic_ncols=True, desc=desc)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, progress: Any) -> None:
        postfix = {"loss": f"{progress.loss:.4g}"}
        if progress.num_scales > 1:
            postfix["scale"] = f"{progress.scale_index + 1}/{progress.num_scales}"
        if progress.tiles:
            postfix["tile"] = f"{progress.tile + 1}/{progress.tiles}"
        postfix["size"] = f"{progress.width}x{progress.height}"
        self.show(progress.iteration, progress.total, postfix)

    def show(self, iteration: int, total: int | None, postfix: dict[str, str], desc: str | None = None) -> None:
        if desc is not None:
            self.bar.set_description_str(desc, refresh=False)
        if total != self.bar.total:
            self.bar.total = total  # a tiled job counts every tile's iterations
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(iteration - self.bar.n)  # tqdm derives it/s and ETA from these
