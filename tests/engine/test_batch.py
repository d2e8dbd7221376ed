"""stylize_batch(): a batch gives each job the result it gets alone, within rounding.

Tolerance: float32 on the CPU, the batched convolution sums in another order than a batch of
one, so gradients agree to ~1e-7 relative, not bit for bit. After the few Adam steps run here
the optimised images agree to max |diff| < 1e-5 (observed ~1e-7). Adam normalises each
coordinate's step, so over hundreds of steps a rounding-level gradient near zero can flip one
pixel's step: long runs agree to the eye, not to 1e-5 (see docs/throughput.md).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from PIL import Image

from stylequeue.engine import OptimState, Progress, preset, stylize
from stylequeue.engine import BatchItem, stylize_batch, stylize_many
from stylequeue.engine.memory import activation_bytes, max_batch
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError
from tests.conftest import make_image

TOLERANCE = 1e-5
FAST = dict(size=32, iterations=6, lr=0.01, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, style_weight=1e9, progress_every=2)


@pytest.fixture
def jobs() -> list[tuple[Image.Image, Image.Image]]:
    """Three (content, style) pairs; all contents 48 x 32, so all outputs are 32 x 21."""
    return [(make_image(48, 32, seed=10 + i), make_image(40, 40, seed=20 + i)) for i in range(3)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _stop_after(n: int) -> Callable[[], bool]:
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > n

    return should_stop


def test_batch_of_three_matches_solo_runs(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **FAST, ema_decay=0.5)
    solo = [stylize(c, [s], cfg, model=model) for c, s in jobs]
    seen: list[list[int]] = [[], [], []]
    items = [BatchItem(c, [s], callback=lambda p, i=i: seen[i].append(p.iteration)) for i, (c, s) in enumerate(jobs)]
    batch = stylize_batch(items, cfg, model=model)
    assert len(batch) == 3
    for alone, together, iterations in zip(solo, batch, seen):
        assert _max_diff(alone.state.image, together.state.image) < TOLERANCE
        assert _max_diff(alone.state.ema_image, together.state.ema_image) < TOLERANCE
        assert together.state.iteration == 6 and not together.stopped
        assert together.metadata()["batch_size"] == 3 and alone.metadata()["batch_size"] == 1
        assert iterations == [2, 4, 6]  # each item's own progress cadence
        assert [h["loss"] for h in together.history] == pytest.approx([h["loss"] for h in alone.history], rel=1e-5)
    # The items really differ: a batch is not one job three times.
    assert _max_diff(batch[0].state.image, batch[1].state.image) > 0.01


@pytest.mark.parametrize("style_loss", ["gram", "wasserstein"])
def test_relative_losses_batch_like_solo_runs(model: VGGFeatures, jobs, style_loss: str) -> None:
    """Relative terms keep one scale per item (its own target's), Wasserstein targets stack."""
    cfg = preset("default", **{**FAST, "style_weight": 10.0, "iterations": 4, "lr": 0.005}, loss_norm="relative",
                 style_loss=style_loss)
    solo = [stylize(c, [s], cfg, model=model) for c, s in jobs[:2]]
    batch = stylize_batch([BatchItem(c, [s]) for c, s in jobs[:2]], cfg, model=model)
    for alone, together in zip(solo, batch):
        assert _max_diff(alone.state.image, together.state.image) < 10 * TOLERANCE
        assert [h["loss"] for h in together.history] == pytest.approx([h["loss"] for h in alone.history], rel=1e-4)
        assert alone.history[-1]["loss"] < alone.history[0]["loss"]  # it optimises


def test_multi_scale_batch_matches_solo_runs(model: VGGFeatures, jobs) -> None:
    """Every scale carries each item's own image and Adam moments up, as a single job does."""
    cfg = preset("default", **{**FAST, "iterations": 3}, scales=2, min_size=16)
    solo = [stylize(c, [s], cfg, model=model) for c, s in jobs[:2]]
    batch = stylize_batch([BatchItem(c, [s]) for c, s in jobs[:2]], cfg, model=model)
    for alone, together in zip(solo, batch):
        assert together.state.scale_index == 1 and together.state.iteration == 6
        assert together.image.size == (32, 21)
        assert _max_diff(alone.state.image, together.state.image) < TOLERANCE


def test_seed_and_blend_may_differ_within_a_batch(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **FAST, init="noise", seed=1)
    other = cfg.replace(seed=2)
    (c0, s0), (c1, s1), _ = jobs
    solo = [stylize(c0, [s0], cfg, model=model), stylize(c1, [s1], other, model=model)]
    batch = stylize_batch([BatchItem(c0, [s0]), BatchItem(c1, [s1], config=other)], cfg, model=model)
    for alone, together in zip(solo, batch):
        assert _max_diff(alone.state.image, together.state.image) < TOLERANCE
    with pytest.raises(ConfigError, match=r"differs from the batch's settings in \['lr'\]"):
        stylize_batch([BatchItem(c0, [s0]), BatchItem(c1, [s1], config=cfg.replace(lr=0.1))], cfg, model=model)


def test_a_cancelled_item_leaves_the_others_as_alone(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **FAST)
    solo = [stylize(c, [s], cfg, model=model) for c, s in jobs]
    stopped_alone = stylize(jobs[1][0], [jobs[1][1]], cfg, model=model, should_stop=_stop_after(2))
    items = [BatchItem(c, [s]) for c, s in jobs]
    items[1].should_stop = _stop_after(2)
    batch = stylize_batch(items, cfg, model=model)
    assert batch[1].stopped and batch[1].state.iteration == 2
    assert _max_diff(batch[1].state.image, stopped_alone.state.image) < TOLERANCE
    for i in (0, 2):
        assert not batch[i].stopped and batch[i].state.iteration == 6
        assert _max_diff(batch[i].state.image, solo[i].state.image) < TOLERANCE
    # Everyone cancelled: the batch ends, each with its own state.
    everyone = stylize_batch([BatchItem(c, [s], should_stop=_stop_after(i)) for i, (c, s) in enumerate(jobs)],
                             cfg, model=model)
    assert [r.stopped for r in everyone] == [True] * 3
    assert [r.state.iteration for r in everyone] == [0, 1, 2]


def test_per_item_checkpoints_resume_alone(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **FAST, checkpoint_every=3)
    saved: list[list[OptimState]] = [[], [], []]
    items = [BatchItem(c, [s], on_checkpoint=saved[i].append) for i, (c, s) in enumerate(jobs)]
    batch = stylize_batch(items, cfg, model=model)
    assert [[s.iteration for s in states] for states in saved] == [[3, 6]] * 3
    solo_checkpoints: list[OptimState] = []
    stylize(jobs[2][0], [jobs[2][1]], cfg, model=model, on_checkpoint=solo_checkpoints.append)
    mid = OptimState.from_bytes(saved[2][0].to_bytes())
    # The same checkpoint a single job writes: image (1, 3, H, W), Adam's moments and step.
    solo_mid = solo_checkpoints[0]
    assert mid.image.shape == solo_mid.image.shape == (1, 3, 21, 32)
    assert _max_diff(mid.image, solo_mid.image) < TOLERANCE
    adam, solo_adam = mid.optimizer_state["state"][0], solo_mid.optimizer_state["state"][0]
    assert float(adam["step"]) == float(solo_adam["step"]) == 3
    assert _max_diff(adam["exp_avg_sq"], solo_adam["exp_avg_sq"]) < 1e-3 * float(solo_adam["exp_avg_sq"].max())
    resumed = stylize(jobs[2][0], [jobs[2][1]], cfg, model=model, resume=mid)
    assert _max_diff(resumed.state.image, batch[2].state.image) < TOLERANCE
    # And a batch can resume from those checkpoints too (all at the same scale).
    again = stylize_batch([BatchItem(c, [s], resume=saved[i][0]) for i, (c, s) in enumerate(jobs)], cfg,
                          model=model)
    for first, second in zip(batch, again):
        assert _max_diff(first.state.image, second.state.image) < TOLERANCE


def test_lbfgs_is_refused_for_more_than_one_item(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **{**FAST, "iterations": 2, "lr": 1.0}, optimizer="lbfgs")
    items = [BatchItem(c, [s]) for c, s in jobs[:2]]
    with pytest.raises(ConfigError, match="L-BFGS jobs one at a time"):
        stylize_batch(items, cfg, model=model)
    # A batch of one is stylize() itself.
    one = stylize_batch(items[:1], cfg, model=model)[0]
    alone = stylize(jobs[0][0], [jobs[0][1]], cfg, model=model)
    assert torch.equal(one.state.image, alone.state.image)


def test_different_output_sizes_are_refused(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **FAST)
    square = make_image(40, 40, seed=5)
    assert cfg.output_sizes(square.size) != cfg.output_sizes(jobs[0][0].size)
    with pytest.raises(ConfigError, match="different output sizes"):
        stylize_batch([BatchItem(jobs[0][0], [jobs[0][1]]), BatchItem(square, [jobs[0][1]])], cfg, model=model)


def test_out_of_memory_halves_the_batch(model: VGGFeatures, jobs) -> None:
    """A GPU is mocked by a hook that fails any training forward of more than two images."""
    cfg = preset("default", **{**FAST, "iterations": 2})
    pairs = [*jobs, (make_image(48, 32, seed=40), make_image(40, 40, seed=41))]
    sizes: list[int] = []

    def fail_big(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            sizes.append(args[0].shape[0])
            if args[0].shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.register_forward_pre_hook(fail_big)
    try:
        results = stylize_many([BatchItem(c, [s]) for c, s in pairs], cfg, model=model, max_batch=4)
    finally:
        hook.remove()
    assert sizes[0] == 4 and set(sizes[1:]) == {2}  # one failed try at 4, then two batches of 2
    solo = [stylize(c, [s], cfg, model=model) for c, s in pairs]
    for alone, together in zip(solo, results):
        assert _max_diff(alone.state.image, together.state.image) < TOLERANCE


def test_memory_estimate_is_monotone_in_size_and_batch() -> None:
    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1")
    sizes = [activation_bytes(s, s, layers) for s in (64, 128, 256, 512, 1024)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert activation_bytes(512, 512, layers, dtype_bytes=2) < activation_bytes(512, 512, layers)
    assert activation_bytes(256, 256, ("relu1_1",)) < activation_bytes(256, 256, layers)  # the cut counts
    per_image = activation_bytes(512, 512, layers)
    batches = [max_batch(free, per_image, cap=64) for free in (2**30, 8 * 2**30, 64 * 2**30, 512 * 2**30)]
    assert batches == sorted(batches) and batches[0] >= 1 and batches[-1] == 64
    assert max_batch(0, per_image, cap=8) == 1  # never below one image
    # Roughly right: VGG19 to relu5_1 at 512 px keeps ~1 GB of float32 activations per image.
    assert 0.5 * 2**30 < per_image < 2 * 2**30


def test_progress_is_per_item(model: VGGFeatures, jobs) -> None:
    cfg = preset("default", **{**FAST, "iterations": 2, "progress_every": 1})
    progress: list[Progress] = []
    items = [BatchItem(c, [s]) for c, s in jobs[:2]]
    items[0].callback = progress.append
    stylize_batch(items, cfg, model=model)
    assert [p.iteration for p in progress] == [1, 2]
    assert progress[-1].preview().size == (32, 21)
