"""The API dies mid-upload (kill -9, OOM): every 202 still ends in
renditions, and `imgworker sweep` leaves no upload lingering."""

import os
import subprocess
import sys
import threading
import time

from imgworker.job import Job
from imgworker.storage import Storage, new_job_id
from harness import samples
from harness.ledger import Ledger
from harness.pipeline import REPO, wait_until


def sweep(pipeline, older_than=0):
    result = subprocess.run([sys.executable, "-m", "imgworker", "--config", pipeline.config_path,
                             "sweep", "--older-than", str(older_than)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_sweep_queues_an_upload_the_api_died_on_and_drops_one_never_accepted(pipeline):
    storage = Storage(pipeline.root)
    # Given what an API killed between fsync and the broker's confirm leaves:
    stranded = new_job_id()
    storage.prepare()
    original = samples.jpeg(640, 480)
    storage.store_upload(Job.accepted(stranded, "jpeg", 640, 480, len(original)), original)
    # ...and what one killed before it wrote the job's state leaves
    never_accepted = new_job_id()
    storage.save_original(never_accepted, samples.jpeg(64, 64))
    for path in (os.path.join(pipeline.root, "jobs", stranded + ".pending"),
                 storage.original_path(never_accepted)):
        age(path, 300)
    pipeline.start_api()
    pipeline.start_worker()
    # When the sweep runs (it does not touch what is younger than requeue_after)
    assert "0 jobs queued again" in sweep(pipeline, older_than=3600)
    output = sweep(pipeline)
    # Then the stranded job is queued and finished, the other upload is gone
    assert "1 jobs queued again, 0 unmarked, 1 uploads dropped" in output
    assert pipeline.wait_job(stranded)["state"] == "done"
    assert pipeline.stored_originals() == [stranded]
    assert pipeline.stored_jobs() == [stranded + ".json"]   # no .pending left


def test_kill_9_of_the_api_during_uploads_loses_nothing_it_accepted(make_pipeline):
    pipeline = make_pipeline(api={"workers": "2"})
    api = pipeline.start_api()
    pipeline.start_worker(1)
    pipeline.start_worker(2)
    ledger = Ledger.for_pipeline(pipeline, "6. kill -9 the API x3")
    stop = threading.Event()
    loads = [ledger.run_load(count=10_000, per_second=25, stop=stop) for _ in range(4)]

    def accepted_again():
        # each API, the first and every restarted one, takes uploads before its kill
        count = len(ledger.accepted) + 300
        wait_until(lambda: len(ledger.accepted) >= count, f"{count} uploads accepted", 60)
    for _ in range(3):
        accepted_again()
        api.kill_tree()
        api = pipeline.start_api()
    accepted_again()
    stop.set()
    for load in loads:
        load.join()
    sweep(pipeline)
    counters = ledger.check()
    print(counters.notes[:10])
    assert counters.accepted > 500
    assert (counters.lost, counters.corrupt, counters.unexpected) == (0, 0, 0)
    # a job done without a 202 needs a request that got no answer
    assert counters.unanswered <= counters.refused.get("no answer", 0)
    # and nothing lingers: every original has its state, no upload is pending
    stored = set(pipeline.stored_originals())
    assert stored == {name[:-5] for name in pipeline.stored_jobs() if name.endswith(".json")}
    assert not [name for name in pipeline.stored_jobs() if name.endswith(".pending")]
    assert set(ledger.accepted) <= stored


def test_the_sweep_removes_stale_temp_files_and_tolerates_ones_that_vanish(pipeline, monkeypatch):
    storage = Storage(pipeline.root)
    storage.prepare()
    stale = os.path.join(pipeline.root, "renditions", ".tmp-stale")
    vanishing = os.path.join(pipeline.root, "jobs", ".tmp-vanishing")
    for path in (stale, vanishing):
        with open(path, "wb") as handle:
            handle.write(b"half")
        age(path, 600)
    # a live writer renames its temp file between the listing and the stat
    real_stat = os.stat

    def racing_stat(path, *args, **kwargs):
        if path == vanishing:
            os.unlink(vanishing)
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", racing_stat)
    assert storage.remove_stale_temp_files(older_than=60) == 1
    assert not os.path.exists(stale)
