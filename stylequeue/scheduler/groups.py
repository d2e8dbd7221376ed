"""Groups of jobs: one content with many styles, or many contents with one style, and a contact
sheet of their results.

(Not to be confused with the GPU batches of stylequeue.engine.stylize_batch, several images in one
forward pass: a group is several jobs, each run wherever the queue sends it.)

A group is a Celery chord: its header is the group of the jobs' chains, its body the
``contact_sheet`` task, which runs once every job has published and stores a grid of the
results under ``<storage_root>/batches/<group_id>/``. If any job fails or is cancelled, Celery
does not run the body: the group ends without a sheet and :meth:`GroupHandle.wait` says which
job failed. Groups were called batches before 0.2: ``submit_batch`` and ``BatchHandle`` remain as
aliases, and what a deployment or producer already sees keeps the old word (the ``batches/``
storage prefix, ``batch-`` generated ids, ``batch_id`` in the sheet task's result).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from celery import Celery, chord
from celery.result import AsyncResult

from stylequeue.exceptions import JobFailedError, JobSpecError
from stylequeue.job import JobSpec, JobStatus
from stylequeue.settings import Settings
from stylequeue.scheduler.jobs import JobHandle, _claim, build_chain, default_app, parse_spec
from stylequeue.tasks.app import TASK_CONTACT_SHEET, settings_of

DEFAULT_TILE = 128


@dataclass
class GroupHandle:
    """A submitted group: its jobs' handles and the contact sheet."""

    group_id: str
    app: Celery = field(repr=False)
    jobs: list[JobHandle]
    sheet_uri: str

    @property
    def batch_id(self) -> str:
        """The name ``group_id`` had before 0.2."""
        return self.group_id

    @property
    def sheet_task_id(self) -> str:
        return f"{self.group_id}.contact_sheet"

    def statuses(self) -> dict[str, JobStatus]:
        return {job.job_id: job.status() for job in self.jobs}

    def wait(self, timeout: float | None = None, poll_s: float = 0.25) -> dict[str, Any]:
        """Wait for every job and the sheet; the sheet task's summary, or JobFailedError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job.wait(timeout=left, poll_s=poll_s)
        sheet = AsyncResult(self.sheet_task_id, app=self.app)
        while sheet.state not in ("SUCCESS", "FAILURE"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"group {self.group_id}: contact sheet not made after {timeout} s")
            time.sleep(poll_s)
        if sheet.state == "FAILURE":
            raise JobFailedError(f"group {self.group_id}: contact sheet failed: {sheet.result}",
                                 job_id=self.group_id, status="failed")
        return dict(sheet.result)


def group_specs(
    group_id: str,
    contents: Sequence[str],
    styles: Sequence[str],
    common: Mapping[str, Any],
    settings: Settings | None = None,
) -> list[JobSpec]:
    """One spec per pair: ``<group_id>-000``, ``-001``, ... in the order of the varying input."""
    if not contents or not styles:
        raise JobSpecError("a group needs at least one content and one style image")
    if len(contents) > 1 and len(styles) > 1:
        raise JobSpecError(
            f"a group is one content with many styles or many contents with one style; got "
            f"{len(contents)} contents and {len(styles)} styles: submit one group per content"
        )
    pairs = [(c, s) for c in contents for s in styles]
    return [
        parse_spec({**common, "job_id": f"{group_id}-{i:03d}", "content": c, "styles": [s]}, settings)
        for i, (c, s) in enumerate(pairs)
    ]


def submit_group(
    contents: Sequence[str],
    styles: Sequence[str],
    *,
    group_id: str | None = None,
    tile: int = DEFAULT_TILE,
    app: Celery | None = None,
    **job_fields: Any,
) -> GroupHandle:
    """Queue one job per (content, style) pair and a contact sheet of their results.

    ``job_fields`` are JobSpec fields shared by every job (``preset``, ``params``, ``priority``,
    ...). Every spec is validated before anything is queued. Submitting the same ``group_id``
    again returns the existing group.
    """
    app = app or default_app()
    settings = settings_of(app)
    group_id = group_id or f"batch-{uuid.uuid4().hex[:12]}"
    specs = group_specs(group_id, contents, styles, job_fields, settings)
    sheet_uri = f"{settings.resolved_storage_root}/batches/{group_id}/contact_sheet.png"
    claimed = [_claim(app, spec) for spec in specs]
    handles = [handle for handle, _ in claimed]
    group = GroupHandle(group_id, app, handles, sheet_uri)
    if not any(new for _, new in claimed):
        return group  # the whole group was submitted before
    header = [
        build_chain(app, spec, handle.task_ids)
        for spec, handle in zip(specs, handles)
    ]
    info = {"group_id": group_id, "sheet_uri": sheet_uri, "tile": tile}
    body = app.signature(TASK_CONTACT_SHEET, kwargs={"group": info}).set(task_id=group.sheet_task_id)
    chord(header, body).apply_async()
    return group


def submit_batch(
    contents: Sequence[str], styles: Sequence[str], *, batch_id: str | None = None, **kwargs: Any
) -> GroupHandle:
    """The name :func:`submit_group` had before 0.2 (``batch_id`` is ``group_id``)."""
    return submit_group(contents, styles, group_id=batch_id, **kwargs)


BatchHandle = GroupHandle  # the name GroupHandle had before 0.2
