"""What a producer imports: submit jobs, batches and manifests, and follow them.

```python
from stylequeue.scheduler import submit, get_job, submit_group, submit_manifest, list_jobs
```

Nothing here imports torch: producers stay light. Periodic work (manifest pick-up, preview
expiry, lost-message recovery) is Celery beat's: its tasks are in :mod:`stylequeue.scheduler.beat`,
its schedule in :mod:`stylequeue.tasks.app`, and ``stylequeue beat`` starts it.
``submit_batch``/``BatchHandle`` are the old names of ``submit_group``/``GroupHandle``.
"""

from stylequeue.scheduler.groups import BatchHandle, GroupHandle, submit_batch, submit_group
from stylequeue.scheduler.history import list_jobs
from stylequeue.scheduler.jobs import JobHandle, get_job, submit
from stylequeue.scheduler.manifest import ManifestReport, parse_manifest, submit_manifest

__all__ = [
    "BatchHandle",
    "GroupHandle",
    "JobHandle",
    "ManifestReport",
    "get_job",
    "list_jobs",
    "parse_manifest",
    "submit",
    "submit_batch",
    "submit_group",
    "submit_manifest",
]
