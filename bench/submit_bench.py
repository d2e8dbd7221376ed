"""What lost-message recovery costs a producer: ``submit()`` with and without remembered messages.

``python -m bench.submit_bench [--jobs 300] [--out bench/results/submit_cpu.md]``

Two apps on one private redis-server, side by side in one run, rounds interleaved so machine
load falls on both alike: the service's app (``RecordingAMQP``: each job message is also written
to the result backend, and the job id to the active-jobs index) and the same app with Celery's
plain AMQP helper. Both add the job to the active-jobs index (that is in ``submit`` itself); only
the message copy differs. Nothing consumes the queues; only the producer's side is timed.
Reports the per-submit median and p95 of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from celery.app.amqp import AMQP

from stylequeue.scheduler import submit
from stylequeue.settings import load_settings
from stylequeue.tasks.app import make_app
from testbed.redis import RedisServer


def _apps(redis: RedisServer, data_dir: str) -> dict[str, object]:
    env = {"STYLEQUEUE_BROKER_URL": redis.url_for(0), "STYLEQUEUE_RESULT_BACKEND": redis.url_for(1),
           "STYLEQUEUE_DATA_DIR": data_dir, "STYLEQUEUE_STORAGE_ROOT": f"file://{data_dir}/objects"}
    remembering = make_app(load_settings(environ=env))
    plain = make_app(load_settings(environ=env))
    plain.amqp_cls = AMQP  # before first use of .amqp: Celery's own helper, nothing remembered
    plain.__dict__.pop("amqp", None)
    return {"remembering": remembering, "plain": plain}


def run(jobs: int, rounds: int = 5) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"remembering": [], "plain": []}
    with RedisServer() as redis, tempfile.TemporaryDirectory() as data_dir:
        apps = _apps(redis, data_dir)
        inputs = Path(data_dir) / "objects" / "in"
        inputs.mkdir(parents=True)
        content = f"file://{inputs}/c.png"
        spec = {"content": content, "styles": [content], "params": {"size": 32, "iterations": 2}}
        for name, app in apps.items():  # warm connections and imports
            submit({**spec, "job_id": f"warm-{name}"}, app=app)
        per_round = max(1, jobs // rounds)
        for _ in range(rounds):
            for name, app in apps.items():
                for _ in range(per_round):
                    started = time.perf_counter()
                    submit({**spec, "job_id": f"b-{uuid.uuid4().hex[:12]}"}, app=app)
                    times[name].append(time.perf_counter() - started)
    return times


def report(times: dict[str, list[float]]) -> str:
    def p95(values: list[float]) -> float:
        return sorted(values)[int(0.95 * (len(values) - 1))]

    rows = ["| producer app | submits | median ms | p95 ms |", "|---|---|---|---|"]
    for name, values in times.items():
        rows.append(f"| {name} | {len(values)} | {1000 * statistics.median(values):.2f} | "
                    f"{1000 * p95(values):.2f} |")
    ratio = statistics.median(times["remembering"]) / statistics.median(times["plain"])
    return ("# submit() cost of remembered messages (CPU machine, loopback Redis)\n\n" + "\n".join(rows)
            + f"\n\nmedian ratio remembering / plain: **{ratio:.2f}x** (interleaved rounds, one run)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="submits per app")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    text = report(run(args.jobs))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
