"""A style-transfer job: its states, its spec (validated before anything is queued), its outputs.

```python
spec = JobSpec.parse({"content": "s3://in/cat.png", "styles": ["s3://in/scream.jpg"],
                      "params": {"size": 256, "iterations": 200}})
spec.message()                     # small JSON dict for Celery: URIs and numbers, never images
spec.style_config()                # the engine's StyleConfig (preset + params)
paths = JobPaths.for_spec(spec, settings)
paths.result, paths.metadata       # s3://.../jobs/<job_id>/result.png, .../result.json
```

Output layout under the job's prefix (``output``, default ``<storage_root>/jobs/<job_id>``)::

    result.<png|jpg|webp>                 the image
    result.json                           metadata, written LAST: its presence means "complete"
    previews/it<NNNNNN>-t<unix>.png       every N iterations; the time lets beat expire them
    checkpoint.pt                         optimiser state, for resuming a redelivered job
    work/step<NN>.json, work/final.png    what chain steps hand each other (removed on publish)
    work/tiles/p<P>/t<NNNN>.{png,pt,json} a tiled job's tiles: picture, checkpoint, record
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stylequeue.exceptions import ConfigError, JobSpecError, StorageError
from stylequeue.storage.uri import check_allowed, parse_object_uri, parse_uri
from stylequeue.webhooks import EVENTS, TERMINAL_EVENTS, check_url

if TYPE_CHECKING:
    from stylequeue.engine.config import StyleConfig
    from stylequeue.settings import Settings

# Matched whole (fullmatch): "$" would let a trailing newline into task ids, logs and keys.
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_STYLES = 8
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
# Engine settings a job may not set: the worker owns the device, the deployment the cadence.
_NOT_JOB_PARAMS = {
    "device": "the worker chooses the device (STYLEQUEUE_DEVICE)",
    "progress_every": "progress cadence is the deployment's (STYLEQUEUE_PROGRESS_EVERY)",
    "checkpoint_every": "use the job's top-level checkpoint_every field",
}


def _check_uri(uri: str) -> str:
    """Syntax only (scheme, absolute path, no '..'); the allow-list needs settings."""
    try:
        parse_uri(uri)
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    return uri.rstrip("/") if "://" in uri.rstrip("/") else uri  # one spelling per prefix


def _check_object_uri(uri: str) -> str:
    """An input must name one object, not a bucket or folder (said in our words, not botocore's)."""
    try:
        parse_object_uri(uri)
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    return uri


StorageURI = Annotated[str, AfterValidator(_check_uri)]
ObjectURI = Annotated[str, AfterValidator(_check_object_uri)]
# The fields that decide a job's result: the same id with other values here is another job
# (JobSpec.digest). Priority and cadence change when and how often, never what.
RESULT_FIELDS = ("content", "styles", "output", "preset", "params", "weights", "output_format")


class JobStatus(str, Enum):
    """Where a job is. Values are what result.json and the CLI print."""

    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    PUBLISHING = "publishing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT})


class Webhook(BaseModel):
    """Where to POST a job's events (docs/service.md#webhooks); the terminal ones unless named."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(description="https:// (or http://) URL on the deployment's webhook allow-list")
    events: list[str] = Field(default_factory=lambda: list(TERMINAL_EVENTS), min_length=1,
                              description=f"any of {', '.join(EVENTS)}")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_url(value, None)  # its form; the allow-list needs settings (JobSpec._check_allowed)
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e not in EVENTS]
        if unknown:
            raise ValueError(f"unknown event(s) {', '.join(map(repr, unknown))}; choose from {', '.join(EVENTS)}")
        return list(dict.fromkeys(value))


class JobSpec(BaseModel):
    """What a producer asks for. Strict: unknown fields and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str | None = Field(None, description="[A-Za-z0-9_-], at most 128; a uuid4 hex if absent")
    content: ObjectURI = Field(description="content image URI (s3://bucket/key or file:///abs/path)")
    styles: list[ObjectURI] = Field(min_length=1, max_length=MAX_STYLES, description="style image URIs")
    output: StorageURI | None = Field(
        None, description="output URI prefix; default <storage_root>/jobs/<job_id>")
    preset: str = Field("default", description="engine preset: seed, gatys or default")
    params: dict[str, Any] = Field(default_factory=dict, description="StyleConfig overrides")
    weights: str | None = Field(None, description="override the worker's weights source")
    output_format: Literal["png", "jpg", "webp"] = "png"
    priority: int | None = Field(
        None, ge=0, le=9, description="0 is the highest with Celery's Redis transport; None: queue default")
    preview_every: int | None = Field(None, ge=0, description="iterations between previews; 0 = none")
    checkpoint_every: int | None = Field(None, ge=0, description="iterations between checkpoints; 0 = none")
    # Not a result field: who hears of the job changes nothing in what it makes (digest).
    webhook: Webhook | None = Field(None, description="URL and events to POST, signed (docs/service.md)")

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        if value is not None and not JOB_ID_RE.fullmatch(value):
            raise ValueError(
                f"{value[:40]!r} is not a valid job id: use 1 to 128 of A-Z a-z 0-9 _ - "
                f"(it becomes part of storage keys and task ids)")
        return value

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        from stylequeue.engine.presets import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of: {', '.join(PRESETS)}")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, why in _NOT_JOB_PARAMS.items():
            if key in value:
                raise ValueError(f"{key!r} cannot be set by a job: {why}")
        # An invalid preset is reported on its own field; check params against the default then.
        _style_config(info.data.get("preset", "default"), value)
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str | None) -> str | None:
        from stylequeue.engine.sources import is_random, parse_random

        if value is None or value == "imagenet":
            return value
        if is_random(value):
            parse_random(value)  # a bounded seed and a known network, or a ConfigError (a ValueError)
            return value
        if "://" not in value:
            raise ValueError(
                f"{value!r}: a job names weights as 'imagenet', 'random[:SEED[:vgg16]]' or a storage "
                f"URI (s3://bucket/key); worker-local paths are the deployment's to choose")
        return _check_object_uri(value)

    @model_validator(mode="after")
    def _defaults_and_allow_list(self, info: ValidationInfo) -> "JobSpec":
        if self.job_id is None:
            self.job_id = uuid.uuid4().hex
        _check_engine_inputs(self)
        settings = (info.context or {}).get("settings")
        if settings is not None:
            _check_allowed(self, settings)
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any] | str | bytes, settings: "Settings | None" = None) -> "JobSpec":
        """Validate a spec (a dict, or JSON text) or raise :class:`JobSpecError` naming each bad field.

        With ``settings``, every URI must also lie under the deployment's allowed prefixes.
        """
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise JobSpecError(f"job spec is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise JobSpecError(f"a job spec is a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data), context={"settings": settings})
        except ValidationError as exc:
            raise JobSpecError(format_errors(exc)) from None

    def digest(self) -> str:
        """sha256 of the fields that decide the result (RESULT_FIELDS), canonically encoded."""
        fields = self.model_dump(mode="json", include=set(RESULT_FIELDS))
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def style_config(self) -> "StyleConfig":
        """The engine configuration: the preset with this job's params applied."""
        return _style_config(self.preset, self.params)

    def message(self) -> dict[str, Any]:
        """The Celery argument: a small JSON dict (URIs, names, numbers) that validates back."""
        return self.model_dump(mode="json")

    def public_dict(self) -> dict[str, Any]:
        """The spec as recorded in result.json. The webhook is left out: its URL may be a
        capability (a token in its query), and it did not shape the result."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"webhook"})

    def output_prefix(self, settings: "Settings") -> str:
        return self.output or f"{settings.resolved_storage_root}/jobs/{self.job_id}"

    def stages(self) -> tuple[int, int]:
        """(stylize steps, tile passes): a tiled job's final scale is its tiles, not a step."""
        config = self.style_config()
        if config.tile_size:
            return config.scales - 1, config.tile_passes
        return config.scales, 0

    def cadence(self, settings: "Settings") -> tuple[int, int]:
        """(preview_every, checkpoint_every): the job's own, else the deployment's."""
        preview = settings.preview_every if self.preview_every is None else self.preview_every
        checkpoint = settings.checkpoint_every if self.checkpoint_every is None else self.checkpoint_every
        return preview, checkpoint


def _style_config(preset_name: str, params: dict[str, Any]) -> "StyleConfig":
    from stylequeue.engine.presets import preset

    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return preset(preset_name, **params)


def fit_to_fleet(spec: JobSpec, settings: "Settings") -> JobSpec:
    """The spec as the fleet runs it: tiled when its final size is past what one worker's device
    holds (``worker_memory_mb``, by the memory model: memory.tiling), untouched otherwise.

    Written into the spec's params before it is claimed, so the job's digest, its messages and
    every worker agree on them, and the same submission is tiled the same way again.
    """
    from stylequeue.engine.memory import tiling

    config = spec.style_config()
    if not settings.worker_memory_mb or config.tile_size:
        return spec
    dtype_bytes = 4 if config.precision == "fp32" or settings.device == "cpu" else 2
    changes = tiling(config, settings.worker_memory_mb * 2**20, dtype_bytes=dtype_bytes)
    if not changes:
        return spec
    return JobSpec.parse({**spec.message(), "params": {**spec.params, **changes}}, settings)


def _check_engine_inputs(spec: JobSpec) -> None:
    """What the engine would refuse after a GPU was taken, refused at submit instead."""
    config = spec.style_config()
    if config.init == "image":
        raise ValueError("params.init 'image' needs an initial image, which a job cannot give; use 'content' or 'noise'")
    blend = config.style_blend_weights
    if blend is not None and len(blend) != len(spec.styles):
        raise ValueError(
            f"params.style_blend_weights has {len(blend)} weights for {len(spec.styles)} styles; give one per style")


def _check_allowed(spec: JobSpec, settings: "Settings") -> None:
    from stylequeue.storage.store import parse_prefix

    prefixes = [parse_prefix(p) for p in settings.allowed_prefix_list]
    named = [("content", spec.content), *((f"styles.{i}", u) for i, u in enumerate(spec.styles))]
    weights_uri = spec.weights if spec.weights and "://" in spec.weights else None
    named += [("output", spec.output), ("weights", weights_uri)]
    for field, uri in named:
        if uri is None:
            continue
        try:
            check_allowed(parse_uri(uri), uri, prefixes)
        except StorageError as exc:
            raise ValueError(f"{field}: {exc}") from None
    if spec.webhook is not None:
        try:  # the allow-list and any IP literal; names are resolved at submit and at sending
            check_url(spec.webhook.url, settings.webhook_allowed, resolve=False)
        except ConfigError as exc:
            raise ValueError(f"webhook.url: {exc}") from None


def format_errors(exc: ValidationError) -> str:
    """One line per problem: ``field: what is wrong (got ...)``."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "spec"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown field; valid fields are: {', '.join(JobSpec.model_fields)}"
        elif err["type"] not in ("value_error", "missing") and "input" in err:
            message += f" (got {_short(err['input'])})"
        lines.append(f"{where}: {message}")
    return "invalid job spec:\n  " + "\n  ".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class JobPaths:
    """Every URI a job reads or writes under its output prefix (one place, so all parts agree)."""

    prefix: str
    result_format: str = "png"

    @classmethod
    def for_spec(cls, spec: JobSpec, settings: "Settings") -> "JobPaths":
        return cls(prefix=spec.output_prefix(settings).rstrip("/"), result_format=spec.output_format)

    @property
    def result(self) -> str:
        return f"{self.prefix}/result.{self.result_format}"

    @property
    def result_content_type(self) -> str:
        return CONTENT_TYPES[self.result_format]

    @property
    def metadata(self) -> str:
        """Written last: a job is complete exactly when this object exists."""
        return f"{self.prefix}/result.json"

    @property
    def checkpoint(self) -> str:
        return f"{self.prefix}/checkpoint.pt"

    @property
    def previews(self) -> str:
        return f"{self.prefix}/previews/"

    def preview(self, iteration: int, timestamp: float) -> str:
        """Previews are PNG whatever the result format; the time in the name lets beat expire them."""
        return f"{self.previews}it{iteration:06d}-t{int(timestamp)}.png"

    @property
    def work_image(self) -> str:
        """The last chain step's image, handed to publish (lossless, removed after publishing)."""
        return f"{self.prefix}/work/final.png"

    def step_metadata(self, step: int) -> str:
        return f"{self.prefix}/work/step{step:02d}.json"

    # A tiled job's final scale: one picture, checkpoint and record per tile and pass.
    def tile_image(self, tile_pass: int, index: int) -> str:
        return f"{self.prefix}/work/tiles/p{tile_pass}/t{index:04d}.png"

    def tile_checkpoint(self, tile_pass: int, index: int) -> str:
        return f"{self.prefix}/work/tiles/p{tile_pass}/t{index:04d}.pt"

    def tile_metadata(self, tile_pass: int, index: int) -> str:
        return f"{self.prefix}/work/tiles/p{tile_pass}/t{index:04d}.json"

    @property
    def work(self) -> str:
        """Everything the chain's tasks hand each other (removed on publish)."""
        return f"{self.prefix}/work/"


__all__ = ["CONTENT_TYPES", "JobPaths", "JobSpec", "JobStatus", "MAX_STYLES", "Webhook", "format_errors"]
