"""OptimState: bytes round trip, and resuming continues exactly like an uninterrupted run."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from stylequeue.engine import OptimState, StyleConfig, preset, stylize
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

FAST = dict(size=32, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, style_weight=1e9, progress_every=2)


def _stop_after(n: int) -> Callable[[], bool]:
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] > n

    return should_stop


def _roundtrip(state: OptimState) -> OptimState:
    return OptimState.from_bytes(state.to_bytes())


def _assert_same_run(a: Any, b: Any) -> None:
    assert torch.equal(a.state.image, b.state.image)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.state.iteration == b.state.iteration and a.state.scale_index == b.state.scale_index


CASES = {
    "adam": dict(optimizer="adam", lr=0.01, iterations=10, ema_decay=0.5),
    "lbfgs": dict(optimizer="lbfgs", lr=1.0, iterations=10),
    "adam-multiscale": dict(optimizer="adam", lr=0.01, iterations=3, scales=2, min_size=16),
    "lbfgs-multiscale": dict(optimizer="lbfgs", lr=1.0, iterations=3, scales=2, min_size=16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stop_save_restore_continues_identically(
    case: str, model: VGGFeatures, content_image, style_image
) -> None:
    cfg = preset("default", **FAST, **CASES[case])
    straight = stylize(content_image, [style_image], cfg, model=model)
    # Stop after 5 iterations (in multi-scale: after 4, i.e. inside the second scale).
    stop_at = 5 if cfg.scales == 1 else 4
    first = stylize(content_image, [style_image], cfg, model=model, should_stop=_stop_after(stop_at))
    assert first.stopped and first.state.iteration == stop_at
    saved = _roundtrip(first.state)
    resumed = stylize(content_image, [style_image], cfg, model=model, resume=saved)
    _assert_same_run(straight, resumed)
    # Resuming leaves the state it was given untouched, so it can be used again.
    assert torch.equal(saved.image, first.state.image) and not saved.image.requires_grad
    if cfg.optimizer == "adam":
        assert torch.equal(saved.optimizer_state["state"][0]["exp_avg"],
                           first.state.optimizer_state["state"][0]["exp_avg"])
    # The stopped run also recorded its losses where it stopped; otherwise the histories agree.
    def losses(history: list[dict]) -> dict[int, dict]:
        return {h["iteration"]: {k: v for k, v in h.items() if k != "elapsed_s"} for h in history}

    straight_losses, resumed_losses = losses(straight.history), losses(resumed.history)
    assert set(resumed_losses) - set(straight_losses) <= {stop_at}
    assert {k: resumed_losses[k] for k in straight_losses} == straight_losses


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("lbfgs", 1.0)])
def test_checkpoint_at_a_scale_boundary_resumes_identically(
    optimizer: str, lr: float, model: VGGFeatures, content_image, style_image
) -> None:
    cfg = preset("default", **FAST, optimizer=optimizer, lr=lr, iterations=3, scales=2, min_size=16,
                 checkpoint_every=3)
    saved: list[OptimState] = []
    straight = stylize(content_image, [style_image], cfg, model=model, on_checkpoint=saved.append)
    assert [(s.iteration, s.scale_index) for s in saved] == [(3, 0), (6, 1)]
    assert saved[0].image.shape[-1] == 16  # saved at the end of the coarse scale
    resumed = stylize(content_image, [style_image], cfg, model=model, resume=_roundtrip(saved[0]))
    _assert_same_run(straight, resumed)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("lbfgs", 1.0)])
def test_one_scale_per_call_continues_like_one_multi_scale_run(
    optimizer: str, lr: float, model: VGGFeatures, content_image, style_image
) -> None:
    """What the service's chain does: each call runs one scale (last_scale) from the previous
    call's final state, which the engine carries up; the end is bit for bit the one-call run."""
    cfg = preset("default", **FAST, optimizer=optimizer, lr=lr, iterations=3, scales=3, min_size=16)
    straight = stylize(content_image, [style_image], cfg, model=model)
    state = None
    for scale in range(cfg.scales):
        step = stylize(content_image, [style_image], cfg, model=model, resume=state, last_scale=scale)
        assert (step.state.scale_index, step.state.iteration) == (scale, 3 * (scale + 1))
        assert step.image.width == cfg.output_sizes(content_image.size)[scale][0]
        state = _roundtrip(step.state)
    _assert_same_run(straight, step)
    def losses(history: list[dict]) -> dict[int, dict]:
        return {h["iteration"]: {k: v for k, v in h.items() if k != "elapsed_s"} for h in history}

    # One history over all scales: the one-call run's, plus each call's report at its scale's end.
    chained, whole = losses(step.history), losses(straight.history)
    assert {k: chained[k] for k in whole} == whole and set(chained) - set(whole) <= {3, 6}
    # A call that finds its scale already finished (a redelivered last step) runs nothing more.
    again = stylize(content_image, [style_image], cfg, model=model, resume=state, last_scale=2)
    assert again.timings["iterations"] == 0
    _assert_same_run(straight, again)


def test_state_bytes_round_trip_keeps_everything(model: VGGFeatures, content_image, style_image) -> None:
    cfg = preset("default", **FAST, iterations=2, ema_decay=0.9)
    state = stylize(content_image, [style_image], cfg, model=model).state
    back = _roundtrip(state)
    assert torch.equal(back.image, state.image) and torch.equal(back.ema_image, state.ema_image)
    assert back.image.device.type == "cpu" and not back.image.requires_grad
    assert (back.iteration, back.scale_index, back.history) == (2, 0, state.history)
    assert StyleConfig.from_dict(back.config) == cfg
    exp_avg = back.optimizer_state["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, state.optimizer_state["state"][0]["exp_avg"])


def test_bad_states_are_refused(model: VGGFeatures, content_image, style_image) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        OptimState.from_bytes(b"not a checkpoint")
    cfg = preset("default", **FAST, iterations=2)
    state = stylize(content_image, [style_image], cfg, model=model).state
    with pytest.raises(ConfigError, match=r"different settings \['lr'\]"):
        stylize(content_image, [style_image], cfg.replace(lr=0.5), model=model, resume=state)
    # Settings that do not change the result may differ.
    again = stylize(content_image, [style_image], cfg.replace(progress_every=1), model=model, resume=state)
    assert again.state.iteration == 2
