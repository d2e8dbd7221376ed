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


# The rooms, lowest first: a module may import from its own room and the rooms below it, never
# from one above (docs/architecture.md draws them).
ROOMS = (
    ("exceptions", "fileio", "settings", "contact_sheet", "webhooks"),
    ("engine",),
    ("storage",),
    ("job",),
    ("worker",),
    ("tasks",),
    ("scheduler",),
    ("monitoring",),
    ("cli", "__main__"),
)


def _room(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "__init__"
    for rank, names in enumerate(ROOMS):
        if part in names:
            return rank
    raise AssertionError(f"{module} belongs to no room; add it to ROOMS and docs/architecture.md")


def test_no_module_imports_from_a_room_above_it() -> None:
    import ast
    from pathlib import Path

    import stylequeue

    root = Path(stylequeue.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("stylequeue", *path.relative_to(root).with_suffix("").parts))
        if module in ("stylequeue.__init__", "stylequeue.__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("stylequeue.") and _room(name) > _room(module):
                    upward.append(f"{module} imports {name}")
    assert upward == []
