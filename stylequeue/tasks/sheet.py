"""The task that ends a group of jobs: a contact sheet of their results (the chord's body)."""

from __future__ import annotations

from typing import Any

from stylequeue.contact_sheet import make_contact_sheet
from stylequeue.engine.images import encode_image
from stylequeue.tasks import objects
from stylequeue.tasks.app import TASK_CONTACT_SHEET, app
from stylequeue.tasks.base import JobTask, settings
from stylequeue.worker.resources import resources_for


@app.task(bind=True, base=JobTask, name=TASK_CONTACT_SHEET)
def contact_sheet(self: JobTask, results: list[dict[str, Any]], group: dict[str, Any]) -> dict[str, Any]:
    """A grid of a group's results, stored at the group's ``sheet_uri``. (The result keeps the key
    ``batch_id``, the name groups had before 0.2: producers read it.)"""
    store = resources_for(settings).storage
    images, labels = [], []
    for result in results:
        images.append(objects.decode_own_image(store.get_bytes(result["result_uri"])))
        labels.append(result["job_id"].rsplit("-", 1)[-1])
    sheet = make_contact_sheet(images, tile=group.get("tile", 128), labels=labels)
    uri = group["sheet_uri"]
    store.put_bytes(uri, encode_image(sheet, "png"), content_type="image/png")
    return {"batch_id": group["group_id"], "sheet_uri": uri, "width": sheet.width,
            "height": sheet.height, "jobs": [r["job_id"] for r in results]}
