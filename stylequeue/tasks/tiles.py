"""A tiled job's final scale, spread over the fleet: plan the tiles, one GPU task per tile, blend.

For each pass ``p`` the chain holds one planner, ``<job>.tiles.<p>`` (light queue), placed after
the coarse stylize steps. It reads the content's size, plans the grid (engine/tiled.py), records
the tile task ids where producers and the recovery sweep find them (JobControl.record_tiles), and
replaces itself (Celery's ``Task.replace``) with a chord: every tile, ``<job>.tile.<p>.<i>`` on the
GPU queue, then ``stylequeue.blend`` under the planner's own id, after which the chain goes on
(the next pass's planner, or publish). Any worker of the GPU queue takes any tile.

Every tile starts from the latest whole picture (``work/final.png``: the coarse result, then the
previous pass's blend), holds its own lease, checkpoints to its own ``checkpoint.pt`` (a tile
redelivered after a crash resumes it), honours cancellation, and writes its picture and record
under ``work/tiles/``; a tile whose picture exists is done. The blend writes ``work/final.png``.
What the tiles of a pass share (that picture, and the statistics of the whole that each tile's
objective needs: engine/tiled.py ``picture_stats``) a worker makes once per pass, not per tile.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import chord
from PIL import Image

from stylequeue.engine.images import encode_image
from stylequeue.engine.tiled import PictureStats, blend_tiles, final_plan, picture_stats, run_tile, tile_config
from stylequeue.engine.tiles import TilePlan
from stylequeue.tasks import objects
from stylequeue.tasks.app import TASK_BLEND, TASK_TILE, TASK_TILES, app
from stylequeue.tasks.base import JobTask, finished_record, load_job, resources, settings
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.gpu import GpuRun, gpu_run

log = logging.getLogger(__name__)


def tile_task_id(job_id: str, tile_pass: int, index: int) -> str:
    return f"{job_id}.tile.{tile_pass}.{index}"


@app.task(bind=True, base=JobTask, name=TASK_TILES)
def tiles(self: JobTask, message: dict[str, Any], tile_pass: int = 0) -> Any:
    """Light queue: plan pass ``tile_pass``'s tiles and fan them out (this task becomes the chord)."""
    spec, paths, store = load_job(message)
    if finished_record(store, paths, spec) is not None:
        return {"job_id": spec.job_id, "already_done": True}
    self.check_cancelled(spec.job_id)
    content = objects.read_image(store, spec.content, settings)
    plan = final_plan(spec.style_config(), content.size, tile_pass)
    ids = [tile_task_id(spec.job_id, tile_pass, t.index) for t in plan.tiles]
    JobControl(self.app).record_tiles(spec.job_id, tile_pass, plan.to_dict(), ids)
    log.info("job %s pass %d: %d tiles of %d px (%dx%d)", spec.job_id, tile_pass, len(ids), plan.tile,
             plan.width, plan.height)
    options = {"priority": spec.priority if spec.priority is not None else self.app.conf.task_default_priority}
    header = [self.app.signature(TASK_TILE, args=(message,), kwargs={"tile_pass": tile_pass, "index": t.index,
                                                                     "plan": plan.to_dict()},
                                 immutable=True).set(task_id=tid, **options)
              for t, tid in zip(plan.tiles, ids)]
    body = self.app.signature(TASK_BLEND, args=(message,), kwargs={"tile_pass": tile_pass, "plan": plan.to_dict()},
                              immutable=True).set(**options)
    return self.replace(chord(header, body))


@app.task(bind=True, base=JobTask, name=TASK_TILE)
def tile(self: JobTask, message: dict[str, Any], tile_pass: int, index: int, plan: dict[str, Any]) -> dict[str, Any]:
    """GPU queue: one tile, from the latest whole picture, resumable from its own checkpoint."""
    spec, paths, store = load_job(message)
    if finished_record(store, paths, spec) is not None or store.exists(paths.tile_image(tile_pass, index)):
        return {"job_id": spec.job_id, "tile": index, "already_done": True}
    self.check_cancelled(spec.job_id)
    grid = TilePlan.from_dict(plan)
    box = grid.tiles[index]
    with gpu_run(self, spec, paths, store, resources) as run:
        started = time.time()
        start, picture = resources.tile_pass((run.owner, tile_pass, grid), lambda: _pass_inputs(run, tile_pass, grid))
        config = tile_config(run.config, grid, box)
        checkpoint = paths.tile_checkpoint(tile_pass, index)
        saved = objects.read_state(store, checkpoint)
        resume = saved if saved is not None and saved.owner == run.owner and saved.matches(config) else None
        # Previews are of whole pictures, and the job's progress counts tiles (JobHandle.progress):
        # a tile's own count is neither.
        reporter = run.reporter(0, job_progress=False)
        poller = run.poller(reporter, config.iterations)
        save = lambda state: run.save_state(checkpoint, state)  # noqa: E731
        result = run_tile(run.content, run.styles, run.config, grid, box, start, model=run.model,
                          target_cache=resources.target_cache(), picture=picture, callback=reporter,
                          should_stop=poller, resume=resume, on_checkpoint=save)
        if result.stopped:
            run.stopped(poller.reason, lambda: result.state is not None and save(result.state))
        record = {"pass": tile_pass, "tile": index, "box": list(box.box), "worker": self.request.hostname,
                  "started_from": "resumed" if resume else "fresh",
                  "resumed_from_iteration": resume.iteration if resume else None,
                  # No state: the tile ran out of memory and ran as smaller pieces (engine/tiled.py).
                  "iterations_done": result.state.iteration if result.state else config.iterations,
                  "split": result.state is None,
                  "timings": result.timings, "seconds": round(time.time() - started, 3),
                  "final_loss": result.history[-1]["loss"] if result.history else None}
        run.write(paths.tile_metadata(tile_pass, index), objects.to_json(record), "application/json")
        run.save_image(paths.tile_image(tile_pass, index), result.image)  # last: its presence means done
        return {"job_id": spec.job_id, "tile": index, "pass": tile_pass}


def _pass_inputs(run: GpuRun, tile_pass: int, grid: TilePlan) -> tuple[Image.Image, PictureStats]:
    """The pass's starting picture (the coarse result or the last blend) and the whole picture's
    statistics from it, which every tile of the pass needs alike."""
    start = objects.decode_own_image(run.store.get_bytes(run.paths.work_image)) if run.spec.stages()[0] else run.content
    return start, picture_stats(run.content, start, grid, run.config, run.model)


@app.task(bind=True, base=JobTask, name=TASK_BLEND)
def blend(self: JobTask, message: dict[str, Any], tile_pass: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Light queue (the chord's body, under the planner's id): the tiles blended into the picture."""
    spec, paths, store = load_job(message)
    if finished_record(store, paths, spec) is not None:
        return {"job_id": spec.job_id, "already_done": True}
    self.check_cancelled(spec.job_id)
    grid = TilePlan.from_dict(plan)
    pictures = [objects.decode_own_image(store.get_bytes(paths.tile_image(tile_pass, t.index))) for t in grid.tiles]
    store.put_bytes(paths.work_image, encode_image(blend_tiles(grid, pictures), "png"), "image/png")
    return {"job_id": spec.job_id, "pass": tile_pass, "tiles": len(grid.tiles)}


def tile_records(store: Any, spec: Any, paths: Any, control: JobControl) -> list[dict[str, Any]]:
    """Every tile's record (publish puts them into result.json)."""
    out = []
    for tile_pass in range(spec.stages()[1]):
        recorded = control.tiles(spec.job_id).get(str(tile_pass))
        if recorded is None:
            continue
        for index in range(len(recorded["task_ids"])):
            out.append(json.loads(store.get_bytes(paths.tile_metadata(tile_pass, index))))
    return out


__all__ = ["blend", "tile", "tile_records", "tile_task_id", "tiles"]
