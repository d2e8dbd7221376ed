"""run_step from task threads: real threads, the real engine on tiny CPU images."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from stylequeue.engine import StyleConfig, preset, stylize
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import JobTimeoutError
from stylequeue.settings import Settings
from stylequeue.worker.resources import Resources
from stylequeue.worker.step import GpuJob, compatibility_key, run_step
from tests.conftest import make_image
from tests.engine.conftest import _Loaded, random_features_state_dict

FAST = dict(size=32, iterations=4, lr=0.01, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, style_weight=1e9, progress_every=2)


@pytest.fixture(scope="module")
def model() -> VGGFeatures:
    info = {"source": "random:0", "sha256": None, "random": True, "seed": 0}
    return VGGFeatures.from_weights(_Loaded(random_features_state_dict(0), info), pooling=StyleConfig().pooling)


def _resources(tmp_path: Any, **changes: Any) -> Resources:
    return Resources(Settings(data_dir=str(tmp_path), batch_window_s=0.5, target_cache_storage=False, **changes))


def _in_threads(n: int, fn: Any) -> list[Any]:
    out: list[Any] = [None] * n

    def body(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            out[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_three_task_threads_share_one_batch(model: VGGFeatures, tmp_path) -> None:
    resources = _resources(tmp_path, batch_max=3)
    cfg = preset("default", **FAST)
    pairs = [(make_image(48, 32, seed=i), make_image(40, 40, seed=10 + i)) for i in range(3)]
    callback_threads: list[set[int]] = [set(), set(), set()]
    task_threads: list[int] = [0, 0, 0]

    def task(i: int) -> Any:
        task_threads[i] = threading.get_ident()
        content, style = pairs[i]
        return run_step(content, [style], cfg, step=0, model=model, resources=resources,
                        callback=lambda p: callback_threads[i].add(threading.get_ident()))

    results = _in_threads(3, task)
    for i, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        assert result.batch_size == 3 and result.metadata()["batch_size"] == 3
        assert callback_threads[i] == {task_threads[i]}  # progress ran in the task's own thread
        alone = stylize(pairs[i][0], [pairs[i][1]], cfg, model=model)
        assert float((alone.state.image - result.state.image).abs().max()) < 1e-5


def test_cancel_and_deadline_stop_only_their_job(model: VGGFeatures, tmp_path) -> None:
    resources = _resources(tmp_path, batch_max=3, job_soft_time_limit=2)
    cfg = preset("default", **{**FAST, "iterations": 200})
    content, style = make_image(48, 32, seed=1), make_image(40, 40, seed=2)
    progressed = threading.Event()
    begun = time.monotonic()

    def task(i: int) -> Any:
        # Job 0 is cancelled once it has made progress; job 1 is already past its deadline.
        should_stop = progressed.is_set if i == 0 else None
        callback = (lambda _p: progressed.set()) if i == 0 else None
        started = begun - 100 if i == 1 else begun + 100
        return run_step(content, [style], cfg, step=0, model=model, resources=resources,
                        should_stop=should_stop, callback=callback, started=started)

    cancelled, timed_out, third = _in_threads(3, task)
    assert cancelled.stopped and 0 < cancelled.state.iteration < 200 and cancelled.batch_size == 3
    assert isinstance(timed_out, JobTimeoutError) and "time limit of 2 s" in str(timed_out)
    assert not isinstance(third, BaseException) and not third.stopped and third.state.iteration == 200


def test_compatibility_key(model: VGGFeatures) -> None:
    cfg = preset("default", **FAST)
    wide, square = make_image(48, 32, seed=1), make_image(40, 40, seed=2)

    def key(content: Any, config: Any) -> Any:
        return compatibility_key(GpuJob(content, [square], config, model, deadline=0.0, last_scale=0))

    assert key(wide, cfg) == key(make_image(48, 32, seed=5), cfg.replace(seed=3, progress_every=5))
    assert key(wide, cfg) != key(square, cfg)  # another output size
    assert key(wide, cfg) != key(wide, cfg.replace(lr=0.5))
    lbfgs = cfg.replace(optimizer="lbfgs", lr=1.0)
    assert key(wide, lbfgs) != key(wide, lbfgs)  # L-BFGS jobs never share a batch
