"""The load test (issue 4): 500 small jobs through two workers. Not in the quick suite.

Run it with ``pytest -m load tests/load`` (about 3-6 minutes on 2 CPU cores), or as a script that
prints its figures: ``python -m tests.load.run``. docs/reliability.md has the figures of a run.
"""

from __future__ import annotations

import pytest

from tests.load.run import run_load

pytestmark = [pytest.mark.load, pytest.mark.timeout(1800)]

# Peak broker memory allowed above its idle baseline: 500 queued chains take a few MB; a leak
# (results without TTL, queues that never drain) grows past this.
MEMORY_BOUND = 64 * 1024 * 1024


def test_500_jobs_through_two_workers_none_lost_none_twice(tmp_path) -> None:
    report = run_load(jobs=500, gpu_workers=2, result_expires=60, tmp=tmp_path)
    print(report.table())
    assert report.succeeded == 500 and report.failed == 0, report.errors
    assert report.lost == 0 and report.duplicates == 0 and report.redelivered == 0
    assert not report.errors, report.errors
    assert report.peak_used_memory - report.baseline_used_memory < MEMORY_BOUND
    assert 0 < report.max_result_ttl_s <= 60
    assert report.results_left_after_expiry == 0
    assert report.control_keys_left_after_expiry == 0 and report.active_jobs_left == 0
