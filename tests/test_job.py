"""JobSpec validation (before anything is queued), JobStatus and the output layout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stylequeue.engine.config import StyleConfig
from stylequeue.exceptions import JobSpecError
from stylequeue.job import JobPaths, JobSpec, JobStatus
from stylequeue.settings import Settings


def spec(**fields: Any) -> dict[str, Any]:
    return {"content": "s3://in/content.png", "styles": ["s3://in/style.jpg"], **fields}


def test_minimal_spec_gets_id_defaults_and_round_trips() -> None:
    job = JobSpec.parse(spec(params={"size": 64, "iterations": 5}))
    assert len(job.job_id or "") == 32 and job.preset == "default" and job.output_format == "png"
    config = job.style_config()
    assert (config.size, config.iterations) == (64, 5)
    message = job.message()
    assert json.loads(json.dumps(message)) == message  # JSON-able, nothing else
    assert JobSpec.model_validate(message) == job  # what a task rebuilds is what was sent
    assert JobSpec.parse(json.dumps(message)) == job


def test_full_spec() -> None:
    job = JobSpec.parse(spec(
        job_id="cat_scream-01", styles=["s3://in/a.png", "file:///data/b.png"], output="s3://out/cats/1",
        preset="gatys", params={"style_layers": ["relu1_1", "relu2_1"], "style_layer_weights": [1.0, 2.0],
                                "iterations": 20, "size": 128},
        weights="random:7", output_format="webp", priority=0, preview_every=5, checkpoint_every=10))
    assert job.style_config().optimizer == "lbfgs"  # from the preset
    assert job.style_config().style_layers == ("relu1_1", "relu2_1")
    assert job.cadence(Settings()) == (5, 10)
    assert JobSpec.parse(spec()).cadence(Settings(preview_every=7, checkpoint_every=3)) == (7, 3)


def errors_of(data: Any, settings: Settings | None = None) -> str:
    with pytest.raises(JobSpecError) as info:
        JobSpec.parse(data, settings)
    return str(info.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"colour": "blue"}, "colour: unknown field; valid fields are: job_id"),
        ({"priority": "5"}, "priority: Input should be a valid integer (got '5')"),
        ({"priority": 10}, "priority: Input should be less than or equal to 9"),
        ({"priority": True}, "priority: Input should be a valid integer"),
        ({"styles": "s3://in/style.jpg"}, "styles: Input should be a valid list"),
        ({"styles": []}, "styles: List should have at least 1 item"),
        ({"styles": [f"s3://in/{i}.png" for i in range(9)]}, "styles: List should have at most 8 items"),
        ({"params": {"style_weight": float("nan")}}, "params: style_weight must be a finite number, got nan"),
        ({"params": {"content_weight": float("inf")}}, "params: content_weight must be a finite number, got inf"),
        ({"params": {"tv_weight": -1.0}}, "params: tv_weight must be a finite number >= 0, got -1.0"),
        ({"params": {"style_layers": ["relu1_1", "relu9_9"]}}, "params: unknown VGG19 style layer(s) ['relu9_9']"),
        ({"params": {"iterations": 0}}, "params: iterations must be a whole number from 1 to 100000, got 0"),
        ({"params": {"iterations": 10**9}}, "params: iterations must be a whole number from 1 to 100000"),
        ({"params": {"iterations": 2.5}}, "params: iterations must be a whole number"),
        ({"params": {"sharpness": 3}}, "params: unknown style setting(s) ['sharpness']"),
        ({"params": {"device": "cuda:3"}}, "params: 'device' cannot be set by a job"),
        ({"preset": "van-gogh"}, "preset: unknown preset 'van-gogh'; choose one of: seed, gatys, default"),
        ({"job_id": "a/../b"}, "job_id: 'a/../b' is not a valid job id"),
        ({"job_id": "x" * 129}, "is not a valid job id: use 1 to 128"),
        ({"job_id": ""}, "job_id: '' is not a valid job id"),
        ({"content": "http://example.com/c.png"}, "content: unsupported URI scheme 'http'"),
        ({"content": "file://relative/c.png"}, "content: 'file://relative/c.png' is a relative or remote file URI"),
        ({"styles": ["s3://in/../secret/s.png"]}, "styles.0: 's3://in/../secret/s.png' contains '..'"),
        ({"weights": "/etc/vgg.pth"}, "weights: '/etc/vgg.pth': a job names weights as 'imagenet'"),
        ({"output_format": "gif"}, "output_format: Input should be 'png', 'jpg' or 'webp'"),
        ({"preview_every": -1}, "preview_every: Input should be greater than or equal to 0"),
    ],
)
def test_bad_specs_name_the_field(fields: dict[str, Any], expected: str) -> None:
    assert expected in errors_of(spec(**fields))


def test_every_problem_reported_at_once() -> None:
    message = errors_of({"styles": [], "foo": 1, "priority": -1, "params": {"iterations": 0}})
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["content", "styles", "params", "priority", "foo"]


def test_missing_fields_and_non_mappings() -> None:
    assert "content: Field required" in errors_of({"styles": ["s3://in/s.png"]})
    assert "not valid JSON" in errors_of('{"content": ')
    assert "a mapping of fields, got list" in errors_of("[1, 2]")


def test_json_nan_and_infinity_are_refused() -> None:
    text = '{"content": "s3://in/c.png", "styles": ["s3://in/s.png"], "params": {"style_weight": NaN}}'
    assert "style_weight must be a finite number" in errors_of(text)
    assert "tv_weight" in errors_of(text.replace('"style_weight": NaN', '"tv_weight": -Infinity'))


def test_allow_list_checked_when_settings_are_given(tmp_path: Any) -> None:
    settings = Settings(storage_root="s3://jobs/root", allowed_prefixes="s3://in/")
    assert JobSpec.parse(spec(), settings).content == "s3://in/content.png"
    message = errors_of(spec(styles=["s3://in/s.png", "s3://other-bucket/s.png"]), settings)
    assert "styles.1: 's3://other-bucket/s.png' is outside the storage this deployment allows" in message
    assert "output:" in errors_of(spec(output="s3://elsewhere/out"), settings)
    assert "weights:" in errors_of(spec(weights="s3://models/vgg.pth"), settings)


def test_job_paths_layout() -> None:
    settings = Settings(storage_root="s3://bucket/sq/")
    job = JobSpec.parse(spec(job_id="j1", output_format="jpg"))
    paths = JobPaths.for_spec(job, settings)
    assert paths.prefix == "s3://bucket/sq/jobs/j1"
    assert paths.result == "s3://bucket/sq/jobs/j1/result.jpg" and paths.result_content_type == "image/jpeg"
    assert paths.metadata == "s3://bucket/sq/jobs/j1/result.json"
    assert paths.checkpoint == "s3://bucket/sq/jobs/j1/checkpoint.pt"
    assert paths.preview(40, 1_700_000_000.7) == "s3://bucket/sq/jobs/j1/previews/it000040-t1700000000.png"
    assert paths.step_metadata(1) == "s3://bucket/sq/jobs/j1/work/step01.json"
    custom = JobPaths.for_spec(JobSpec.parse(spec(output="s3://out/x/")), settings)
    assert custom.metadata == "s3://out/x/result.json"


def test_job_status() -> None:
    finished = {s for s in JobStatus if s.is_finished}
    assert finished == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT}
    assert not {JobStatus.VALIDATING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PUBLISHING} & finished
    assert JobStatus("succeeded") is JobStatus.SUCCEEDED and JobStatus.SUCCEEDED == "succeeded"


def test_a_job_too_large_for_one_worker_is_tiled_at_submit() -> None:
    """job.fit_to_fleet: by the memory model, for the deployment's worker_memory_mb."""
    from stylequeue.engine.memory import largest_side
    from stylequeue.job import fit_to_fleet

    settings = Settings(worker_memory_mb=64, device="cpu", allowed_prefixes="s3://in/")
    default = StyleConfig()
    fit = largest_side([*default.content_layers, *default.style_layers], 64 * 2**20, dtype_bytes=4)
    small = JobSpec.parse(spec(params={"size": fit}))
    assert fit_to_fleet(small, settings) is small  # fits: untouched
    big = fit_to_fleet(JobSpec.parse(spec(params={"size": 4 * fit})), settings)
    params = big.params
    assert params["tile_size"] <= fit and params["tile_overlap"] <= params["tile_size"] // 3
    assert params["scales"] == 2 and params["min_size"] <= fit and big.stages() == (1, 1)
    assert fit_to_fleet(big, settings).params == params  # the same submission is tiled the same way
    assert fit_to_fleet(JobSpec.parse(spec(params={"size": 4 * fit})), Settings()).params == {"size": 4 * fit}
