"""What Flower shows of a job's task, without servers: the labels the app's messages carry
(tasks/labels.py) and the page's format_task hook (monitoring/flower.py). The same against a real
Flower fed by real workers: tests/service/test_flower.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, make_app


@pytest.mark.parametrize(
    ("state", "revoked", "timestamp", "shown"),
    [
        ("PROGRESS", 20.0, 10.0, ("REVOKED", "stopped at 37% · iteration 74 of 200")),  # cancelled while it ran
        ("PROGRESS", 20.0, 30.0, ("PROGRESS", "37% · iteration 74 of 200 · ETA 12 s")),  # it ran again since
        ("FAILURE", None, 10.0, ("FAILURE", "stopped at 37% · iteration 74 of 200")),
        ("SUCCESS", None, 10.0, ("SUCCESS", "37% · iteration 74 of 200 · ETA 12 s")),  # a real result is left alone
    ],
)
def test_format_task_shows_how_a_running_task_ended(state: str, revoked: float | None, timestamp: float,
                                                   shown: tuple[str, str]) -> None:
    """Celery's event state keeps PROGRESS over a later task-revoked (the page is mended; the real
    sequence: tests/service/test_flower.py::test_flower_shows_a_running_job_step_percentage_and_link)."""
    from types import SimpleNamespace

    from stylequeue.monitoring.flower import format_task

    task = SimpleNamespace(state=state, revoked=revoked, timestamp=timestamp, args="job j", kwargs="{}",
                           result="37% · iteration 74 of 200 · ETA 12 s")
    shown_task = format_task(task)
    assert (shown_task.state, shown_task.result) == shown


def test_every_task_of_a_tiled_job_is_labelled_in_its_message(tmp_path: Path) -> None:
    """The labels of a tiled job's chain and tiles, as the app's own message maker writes them into
    the header the worker's task-received event reads and into the producer's task-sent event."""
    from stylequeue.job import JobSpec
    from stylequeue.settings import Settings
    from stylequeue.tasks.app import TASK_BLEND, TASK_TILE, TASK_TILES

    spec = JobSpec.parse({"job_id": "big-7", "content": "s3://b/in/cat.jpg", "styles": ["s3://b/in/wave.jpg"],
                          "params": {"size": 256, "scales": 2, "tile_size": 128, "tile_overlap": 16,
                                     "tile_context": 16, "tile_passes": 2}})
    plan = {"rows": [[0, 96], [80, 176], [160, 256]], "columns": [[0, 96], [80, 176], [160, 256]],
            "width": 256, "height": 256, "tile": 96, "overlap": 16, "shifted": False}
    app = make_app(Settings(data_dir=str(tmp_path)))
    sent = [(TASK_VALIDATE, "big-7.validate", {}), (TASK_STYLIZE, "big-7.stylize.0", {"step": 0}),
            (TASK_TILES, "big-7.tiles.0", {"tile_pass": 0}),
            (TASK_TILE, "big-7.tile.1.4", {"tile_pass": 1, "index": 4, "plan": plan}),
            (TASK_BLEND, "big-7.tiles.1", {"tile_pass": 1, "plan": plan}), (TASK_PUBLISH, "big-7.publish", {})]
    labels = []
    for name, task_id, kwargs in sent:
        message = app.amqp.as_task_v2(task_id, name, (spec.message(),), kwargs, create_sent_event=True)
        assert message.headers["argsrepr"] == message.sent_event["args"]
        labels.append(message.headers["argsrepr"].removesuffix(" · cat.jpg styled as wave.jpg"))
    assert labels == ["job big-7 · step 1 of 5 · validate", "job big-7 · step 2 of 5 · stylize, scale 1 of 2",
                      "job big-7 · step 3 of 5 · plan tiles, pass 1 of 2",
                      "job big-7 · step 4 of 5 · tile 5 of 9, pass 2 of 2",
                      "job big-7 · step 4 of 5 · blend tiles, pass 2 of 2", "job big-7 · step 5 of 5 · publish"]
    other = app.amqp.as_task_v2("x", "stylequeue.scan_manifests", (), {}, create_sent_event=True)
    assert other.headers["argsrepr"] == "()"  # not a job's task: Celery's own repr
    app.close()
