"""GET /metrics adds up every process on the host however the processes were
started: here with no environment but the config's path (no unit's
Environment= lines), across gunicorn worker deaths and whole restarts,
with a metrics directory that does not grow (imgworker/metrics.py)."""

import os
import signal
import time

import requests

from harness import samples
from harness.pipeline import children

from .test_metrics import scrape

_UPLOADS = ("imgworker_uploads_total", (("status", "202"),))
_DONE = ("imgworker_jobs_total", (("outcome", "done"),))


def _gunicorn_workers(api, count, timeout=30):
    """The pids of the API's ``count`` gunicorn worker processes, once there
    are that many."""
    deadline = time.monotonic() + timeout
    while True:
        found = children(api.process.pid)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"the API has {found} workers, not {count}"
        time.sleep(0.1)


def _metric_files(pipeline):
    return sorted(os.listdir(pipeline.metrics_dir))


def _files_of_slots(count):
    """Every file ``count`` processes counting at once may leave."""
    return {f"{kind}_{slot}.db" for kind in ("counter", "histogram") for slot in range(count)} | {
        f"slot-{slot}.lock" for slot in range(count)}


def test_the_api_started_with_no_unit_environment_sums_its_four_processes(make_pipeline):
    for name in ("PROMETHEUS_MULTIPROC_DIR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        assert name not in os.environ, f"the test runs with {name} set"
    pipeline = make_pipeline(api={"workers": "4"})      # the shipped default
    api = pipeline.start_api()                           # no env: see Pipeline.start_api
    assert not {"PROMETHEUS_MULTIPROC_DIR", "MALLOC_MMAP_THRESHOLD_"} & set(
        open(f"/proc/{api.process.pid}/environ", "rb").read().decode().split("\0"))
    _gunicorn_workers(api, 4)
    uploads = 40
    for _ in range(uploads):
        # a connection each, so gunicorn spreads them over its processes
        response = requests.post(pipeline.base_url + "/upload", data=samples.jpeg(64, 48),
                                 headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert response.status_code == 202
    # each scrape is answered by whichever process accepts it: every one must add up
    seen = [scrape(pipeline.base_url)[_UPLOADS] for _ in range(12)]
    assert seen == [uploads] * 12
    files = _metric_files(pipeline)
    assert sum(name.startswith("counter_") for name in files) >= 2, files


def test_counters_survive_deaths_and_restarts_and_the_directory_does_not_grow(make_pipeline):
    pipeline = make_pipeline(api={"workers": "2"})
    api = pipeline.start_api()
    worker = pipeline.start_worker()
    total = 0

    def upload_and_count(n):
        nonlocal total
        ids = [pipeline.upload(samples.jpeg(64, 48)).json()["id"] for _ in range(n)]
        assert {pipeline.wait_job(job_id)["state"] for job_id in ids} == {"done"}
        total += n
        counted = scrape(pipeline.base_url)
        assert (counted[_UPLOADS], counted[_DONE]) == (total, total)

    upload_and_count(5)
    settled = _metric_files(pipeline)

    # A gunicorn worker killed: the arbiter starts another, which takes the
    # dead one's slot and counts on from its files.
    victim = _gunicorn_workers(api, 2)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in children(api.process.pid) or len(children(api.process.pid)) < 2:
        assert time.monotonic() < deadline, "gunicorn did not replace its killed worker"
        time.sleep(0.1)
    upload_and_count(5)

    # Whole restarts, as systemctl restart does them, and a worker killed.
    for round_ in range(3):
        assert api.stop() == 0
        api = pipeline.start_api()
        if round_ == 1:
            worker.kill_tree()
        else:
            assert worker.stop() == 0
        worker = pipeline.start_worker()
        upload_and_count(2)
    # At most four processes count at once: the arbiter and the worker from
    # their start, each gunicorn worker from the first upload it answers.
    # Either gunicorn worker may accept an upload, so whether both had one
    # by the time of ``settled`` is chance; the bound is not.
    files = _metric_files(pipeline)
    assert set(settled) <= set(files) <= _files_of_slots(4), files
