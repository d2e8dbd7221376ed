"""Import boundaries the layout promises, checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {line.split(".")[0] for line in out.stdout.split()}


@pytest.mark.parametrize(
    "imports",
    [
        "import stylequeue.scheduler",
        "import stylequeue.tasks.app",
        "from stylequeue.job import JobSpec; JobSpec.parse({'content': 's3://b/c.png', 'styles': ['s3://b/s.png']})",
        "from stylequeue.engine import preset; preset('gatys', size=64)",
    ],
)
def test_producers_and_job_validation_do_not_import_torch(imports: str) -> None:
    assert "torch" not in _modules_after(imports)


def test_engine_imports_no_queue_or_storage_library() -> None:
    loaded = _modules_after(
        "import stylequeue.engine as e\n"
        "from stylequeue.engine import stylize, stylize_batch, VGGFeatures, OptimState\n"
        "import stylequeue.engine.weights, stylequeue.engine.images, stylequeue.engine.targets"
    )
    assert "torch" in loaded
    # (tqdm is not in the list: torch.hub itself imports it.)
    assert not loaded & {"celery", "kombu", "redis", "boto3", "botocore", "flower", "prometheus_client"}
