"""Manifests: a YAML or JSON file of jobs, submitted with a limit on jobs in flight.

Format (YAML shown; the same structure in JSON)::

    defaults:            # optional: fields every job gets unless it sets them itself
      preset: default
      params: {size: 512, iterations: 300}
    jobs:
      - {job_id: cat-wave, content: s3://in/cat.jpg, styles: [s3://in/wave.jpg]}
      - {job_id: dog-wave, content: s3://in/dog.jpg, styles: [s3://in/wave.jpg], priority: 2}

A bare list of jobs is accepted too. Every job is validated before the first one is queued.

Two ways in: ``stylequeue manifest FILE --max-in-flight N`` (a producer that keeps at most N
jobs queued or running, and waits for all), and Celery beat's ``scan_manifests``, which picks up
manifests dropped under ``<storage_root>/manifests/incoming/``, moves each to ``processed/`` and
submits its jobs (there the queue itself holds the backlog).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from celery import Celery

from stylequeue.exceptions import JobSpecError
from stylequeue.job import JobSpec, JobStatus
from stylequeue.settings import Settings
from stylequeue.scheduler.jobs import JobHandle, default_app, parse_spec, submit
from stylequeue.tasks.app import settings_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def parse_manifest(text: str, name: str = "manifest", settings: Settings | None = None) -> list[JobSpec]:
    """Every job in a manifest's text, validated (JobSpecError names the job that is wrong)."""
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise JobSpecError(f"{name}: not valid {'JSON' if name.endswith('.json') else 'YAML'}: {exc}") from None
    defaults: dict[str, Any] = {}
    if isinstance(data, dict):
        unknown = set(data) - {"defaults", "jobs"}
        if unknown:
            raise JobSpecError(f"{name}: unknown top-level keys {sorted(unknown)}; use 'defaults' and 'jobs'")
        defaults, data = data.get("defaults") or {}, data.get("jobs")
    if not isinstance(data, list) or not data or not isinstance(defaults, dict):
        raise JobSpecError(f"{name}: expected a non-empty list of jobs (or a mapping with 'jobs')")
    specs = []
    for index, job in enumerate(data):
        if not isinstance(job, dict):
            raise JobSpecError(f"{name}: job #{index + 1} is not a mapping of fields")
        try:
            specs.append(parse_spec({**defaults, **job}, settings))
        except JobSpecError as exc:
            raise JobSpecError(f"{name}: job #{index + 1} ({job.get('job_id', 'no id')}): {exc}") from None
    ids = [s.job_id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise JobSpecError(f"{name}: job ids appear more than once: {duplicates}")
    return specs


@dataclass
class ManifestReport:
    """How every job of a manifest ended."""

    statuses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_seen_in_flight: int = 0

    @property
    def ok(self) -> bool:
        return all(s == JobStatus.SUCCEEDED.value for s in self.statuses.values())


def _read(path_or_uri: str | Path, app: Celery) -> tuple[str, str]:
    source = str(path_or_uri)
    if "://" in source:
        from stylequeue.storage import open_storage

        return open_storage(settings_of(app)).get_bytes(source).decode(), source
    return Path(source).read_text(), source


def submit_manifest(
    path_or_uri: str | Path,
    *,
    max_in_flight: int | None = None,
    app: Celery | None = None,
    poll_s: float = 0.5,
    on_done: Callable[[JobHandle, JobStatus], None] | None = None,
) -> ManifestReport:
    """Submit a manifest's jobs, never more than ``max_in_flight`` queued or running at once,
    and wait until every job has ended."""
    app = app or default_app()
    limit = max_in_flight or settings_of(app).manifest_max_in_flight
    if limit < 1:
        raise JobSpecError(f"max_in_flight must be at least 1, got {limit}")
    text, name = _read(path_or_uri, app)
    pending = parse_manifest(text, name, settings_of(app))
    report = ManifestReport()
    in_flight: list[JobHandle] = []
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            in_flight.append(submit(pending.pop(0), app=app))
        report.max_seen_in_flight = max(report.max_seen_in_flight, len(in_flight))
        still: list[JobHandle] = []
        for handle in in_flight:
            status = handle.status()
            if status.is_finished:
                _record(report, handle, status)
                if on_done is not None:
                    on_done(handle, status)
            else:
                still.append(handle)
        in_flight = still
        if in_flight:
            time.sleep(poll_s)
    return report


def _record(report: ManifestReport, handle: JobHandle, status: JobStatus) -> None:
    report.statuses[handle.job_id] = status.value
    if status is JobStatus.SUCCEEDED:
        report.results[handle.job_id] = handle.result() or {}
    else:
        report.errors[handle.job_id] = handle.error() or status.value


def scan_incoming(app: Celery, store: Any) -> dict[str, Any]:
    """Move each manifest from ``incoming/`` to ``processed/`` and submit its jobs.

    The move comes first (copy, then delete), so two overlapping scans cannot submit a manifest
    twice in a way that matters: job ids are idempotent anyway. A manifest that does not parse
    goes to ``failed/`` with an ``.error.txt`` beside it.
    """
    root = f"{settings_of(app).resolved_storage_root}/manifests"
    submitted: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    for uri in store.list(f"{root}/incoming/"):
        name = uri.rsplit("/", 1)[-1]
        if not name.endswith(MANIFEST_SUFFIXES):
            continue
        data = store.get_bytes(uri)
        try:
            specs = parse_manifest(data.decode(), name, settings_of(app))
        except (JobSpecError, UnicodeDecodeError) as exc:
            store.put_bytes(f"{root}/failed/{name}", data)
            store.put_bytes(f"{root}/failed/{name}.error.txt", str(exc).encode(), "text/plain")
            store.delete(uri)
            failed[name] = str(exc)
            continue
        store.put_bytes(f"{root}/processed/{name}", data)
        store.delete(uri)
        submitted[name] = [submit(spec, app=app).job_id for spec in specs]
        log.info("manifest %s: submitted %d jobs", name, len(specs))
    return {"submitted": submitted, "failed": failed}
