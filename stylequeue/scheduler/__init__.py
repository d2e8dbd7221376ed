"""What a producer imports: submit jobs, batches and manifests, and follow them.

```python
from stylequeue.scheduler import submit, get_job, submit_batch, submit_manifest
```

Nothing here imports torch: producers stay light. Periodic work (manifest pick-up, preview
expiry) is Celery beat's, configured in :mod:`stylequeue.tasks.app` and started with
``stylequeue beat``.
"""

from stylequeue.scheduler.batch import BatchHandle, submit_batch
from stylequeue.scheduler.jobs import JobHandle, get_job, submit
from stylequeue.scheduler.manifest import ManifestReport, parse_manifest, submit_manifest

__all__ = [
    "BatchHandle",
    "JobHandle",
    "ManifestReport",
    "get_job",
    "parse_manifest",
    "submit",
    "submit_batch",
    "submit_manifest",
]
