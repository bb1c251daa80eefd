"""Erasure (issue 24) with a real RabbitMQ, a real API and real workers: a
job erased in any state it can be in -- queued, rendering, held by a worker
that is killed, stranded by an API that died before publishing, dead-lettered
-- leaves nothing of itself on disk but its tombstone, no message in the
queues, and no job.done/job.failed after its job.deleted. Each test asserts on
the files below the storage root and on the queues, not only on the answers.
Storage and policy alone: tests/test_erasure.py."""

import concurrent.futures
import functools
import json
import os
import signal
import threading
import time

import requests

from imgworker.job import Job
from imgworker.storage import Storage, new_job_id
from harness import samples
from harness.erasure import (Events, bearer, big_jpeg, files_of, nothing_of, settle,
                             stopped_mid_render, upload)
from harness.pipeline import children, wait_until


# -- helpers --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def small_jpeg():
    return samples.jpeg(400, 300)


def delete(pipeline, path, key=None, base_url=None):
    return requests.delete((base_url or pipeline.base_url) + path,
                           headers=bearer(key) if key else {}, timeout=60)


def erased_ok(response, job_id):
    assert response.status_code == 200, response.text
    assert response.json() == {"id": job_id, "erased": True}


# -- the races ------------------------------------------------------------------------

def test_delete_while_queued_the_worker_drops_it_and_nothing_is_served(pipeline):
    # Given a job queued (no worker yet), uploaded with an owner
    pipeline.start_api()
    nginx = pipeline.start_nginx()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, small_jpeg(), owner="x", key=key)
    assert pipeline.queue_depth() == 1
    assert files_of(pipeline.root, [job_id])          # stored, indexed by owner
    # When it is erased
    erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
    # Then its files are gone as the DELETE answers, before any worker ran
    nothing_of(pipeline, job_id)
    # and a worker that gets the message drops it
    worker = pipeline.start_worker()
    worker.wait_log(f"job {job_id}: erased")
    gone = requests.get(f"{pipeline.base_url}/jobs/{job_id}", timeout=10)
    assert gone.status_code == 410 and gone.json()["error"]
    for rendition in pipeline.renditions:
        url = Storage(pipeline.root).rendition_url(job_id, rendition)
        assert requests.get(nginx.base_url + url, timeout=10).status_code == 404
    settle(pipeline, worker)
    nothing_of(pipeline, job_id)
    assert "processing" not in worker.log()
    events.assert_deleted_last(job_id, "x")
    assert [key for key, body in events.seen if body.get("id") == job_id] == ["job.deleted"]
    events.close()


def test_delete_while_a_worker_renders_it_the_renders_are_discarded(pipeline):
    # Given a worker rendering a big job, its renderer held still
    pipeline.start_api()
    worker = pipeline.start_worker()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, big_jpeg(), owner="x", key=key)
    renderer = stopped_mid_render(pipeline, worker, job_id)
    try:
        # When the job is erased mid-render
        erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
        nothing_of(pipeline, job_id)
    finally:
        os.kill(renderer, signal.SIGCONT)
    # Then the worker, once its render is back, writes nothing and acks
    worker.wait_log(f"job {job_id}: erased")
    settle(pipeline, worker)
    nothing_of(pipeline, job_id)
    assert f"job {job_id}: done" not in worker.log()
    events.assert_deleted_last(job_id, "x")
    events.close()


def test_delete_then_the_worker_holding_it_killed_the_redelivery_is_dropped(pipeline):
    # Given a worker rendering a job, its renderer held still
    pipeline.start_api()
    first = pipeline.start_worker(1)
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, big_jpeg(), owner="x", key=key)
    stopped_mid_render(pipeline, first, job_id)       # killed with the worker below
    # When the job is erased, and then the worker killed with it unacknowledged
    erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
    first.kill_tree()
    # Then its message is back in the queue...
    wait_until(lambda: pipeline.queue_depth() == 1, "the job's redelivery back in the queue")
    nothing_of(pipeline, job_id)
    # ...and the next worker drops it, writing nothing
    second = pipeline.start_worker(2)
    second.wait_log(f"job {job_id}: erased")
    settle(pipeline, second)
    nothing_of(pipeline, job_id)
    assert "processing" not in second.log()
    events.assert_deleted_last(job_id, "x")
    events.close()


def test_a_worker_killed_between_staging_and_commit_after_the_delete_leaves_nothing(pipeline):
    """The renderer child writes a job's renditions under temp names in
    renditions/<id>/ before the worker commits them (under the job's lock);
    a worker that dies in between must not leave them for an erased job."""
    pipeline.start_api()
    first = pipeline.start_worker(1)
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, big_jpeg())
    renderer = stopped_mid_render(pipeline, first, job_id)
    erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
    nothing_of(pipeline, job_id)
    # the worker stops (as if about to be killed) while its renderer finishes
    os.kill(first.process.pid, signal.SIGSTOP)
    os.kill(renderer, signal.SIGCONT)
    directory = os.path.join(pipeline.root, "renditions", job_id)
    staged = []
    try:
        wait_until(lambda: os.path.isdir(directory) and os.listdir(directory),
                   "the renderer to stage renditions", timeout=15)
        staged = os.listdir(directory)
    except AssertionError:
        pass        # the renderer wrote nothing: what the erasure wants
    first.kill_tree()
    second = pipeline.start_worker(2)
    second.wait_log(f"job {job_id}: erased")
    settle(pipeline, second)
    # (the renderer stages into renditions/<id>/ with no look at the
    # tombstone; the worker that would have discarded them is dead)
    nothing_of(pipeline, job_id)
    assert staged == [], (f"after DELETE answered, the renderer wrote {staged} into "
                          f"renditions/{job_id}/")


def test_delete_of_an_upload_the_api_died_on_then_the_sweep_queues_nothing(pipeline):
    # Given what an API killed between storing an upload and the broker's
    # confirm leaves (as tests/faults/test_api_faults.py makes it): original,
    # record, pending mark, owner entry -- and no message
    storage = Storage(pipeline.root)
    storage.prepare()
    job_id = new_job_id()
    original = small_jpeg()
    storage.store_upload(Job.accepted(job_id, "jpeg", 400, 300, len(original), owner="x"),
                         original)
    assert os.path.exists(os.path.join(pipeline.root, "jobs", job_id + ".pending"))
    pipeline.start_api()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    assert pipeline.queue_depth() == 0
    # When it is erased, and the sweep runs after
    erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
    nothing_of(pipeline, job_id)
    swept = pipeline.cli("sweep", "--older-than", "0")
    assert "0 jobs queued again" in swept.stderr, swept.stderr
    # Then the sweep queued nothing, and nothing of the job comes back
    assert pipeline.queue_depth() == 0
    worker = pipeline.start_worker()
    settle(pipeline, worker)
    nothing_of(pipeline, job_id)
    events.assert_deleted_last(job_id, "x")
    events.close()


def test_an_erasure_cut_short_of_an_upload_the_api_died_on_is_finished_by_the_sweep(pipeline):
    # Given an upload stranded by an API that died before publishing, and
    # an erasure of it cut short after its tombstone (what an API killed
    # right after step 1 of erasure.py leaves)
    storage = Storage(pipeline.root)
    storage.prepare()
    job_id = new_job_id()
    original = small_jpeg()
    storage.store_upload(Job.accepted(job_id, "jpeg", 400, 300, len(original), owner="x"),
                         original)
    assert storage.lay_tombstone(job_id, "request", timeout=5)["owner"] == "x"
    storage.sync()
    pipeline.start_api()
    events = Events(pipeline)
    # When the sweep runs
    swept = pipeline.cli("sweep", "--older-than", "0")
    # Then it finishes the erasure, and queues nothing of the job
    assert "1 erasures finished" in swept.stderr, swept.stderr
    nothing_of(pipeline, job_id)
    assert pipeline.queue_depth() == 0, (
        f"the sweep queued the erased job again:\n{swept.stderr}")
    events.assert_deleted_last(job_id, "x")
    events.close()


def test_dlq_replay_of_an_erased_failed_job_writes_nothing_back(pipeline):
    # Given a job that failed and was dead-lettered
    pipeline.start_api()
    worker = pipeline.start_worker()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    response = pipeline.upload(data=samples.truncated_jpeg(), params={"owner": "x"},
                               headers={"Content-Type": "image/jpeg", **bearer(key)})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert pipeline.wait_job(job_id)["state"] == "failed"
    wait_until(lambda: pipeline.dead_letters() == [(job_id, "rejected")], "the dead letter")
    # When it is erased, and then the dead letters replayed
    erased_ok(delete(pipeline, f"/jobs/{job_id}", key), job_id)
    nothing_of(pipeline, job_id)
    replayed = pipeline.cli("dlq", "replay", "--all")
    # Then nothing is queued or written back; the dead letter is gone
    assert "0 jobs queued again" in replayed.stdout, replayed.stdout + replayed.stderr
    assert pipeline.dead_letters() == []
    assert pipeline.queue_depth() == 0
    settle(pipeline, worker)
    assert worker.log().count(f"job {job_id}: processing") == 1
    nothing_of(pipeline, job_id)
    events.assert_deleted_last(job_id, "x")
    events.close()


# -- by owner, and cut short ----------------------------------------------------------

def test_erasure_by_owner_takes_all_of_theirs_and_nothing_of_anyone_else(pipeline):
    pipeline.start_api()
    worker = pipeline.start_worker()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    alice = [upload(pipeline, small_jpeg(), owner="alice", key=key) for _ in range(5)]
    bob = [upload(pipeline, small_jpeg(), owner="bob", key=key) for _ in range(2)]
    for job_id in alice + bob:
        assert pipeline.wait_job(job_id)["state"] == "done"

    answer = delete(pipeline, "/owners/alice/jobs", key)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"owner": "alice", "erased": 5}
    nothing_of(pipeline, *alice)
    kept = files_of(pipeline.root, bob)
    assert set(kept) == set(bob)
    for job_id in bob:
        assert f"originals/{job_id}" in kept[job_id]
        assert f"jobs/{job_id}.json" in kept[job_id]
        assert pipeline.job(job_id)["state"] == "done"
    for job_id in alice:
        assert requests.get(f"{pipeline.base_url}/jobs/{job_id}", timeout=10).status_code == 410
    again = delete(pipeline, "/owners/alice/jobs", key)
    assert (again.status_code, again.json()) == (200, {"owner": "alice", "erased": 0})

    erased = pipeline.cli("erase", "--owner", "bob")
    assert json.loads(erased.stdout) == {"owner": "bob", "erased": 2}
    nothing_of(pipeline, *bob)

    events.read(lambda seen: len(events.deleted(alice + bob)) >= 7)
    assert sorted(map(json.dumps, events.deleted(alice + bob))) == sorted(
        [json.dumps({"id": job_id, "owner": "alice", "reason": "request"}) for job_id in alice]
        + [json.dumps({"id": job_id, "owner": "bob", "reason": "request"}) for job_id in bob])
    for job_id in alice:
        events.assert_deleted_last(job_id, "alice")
    for job_id in bob:
        events.assert_deleted_last(job_id, "bob")
    settle(pipeline, worker)
    events.close()


def test_an_owner_erasure_cut_short_by_kill_9_of_the_api_is_finished_by_the_sweep(pipeline):
    # Given 500 jobs of one owner, stored and queued (no worker: nothing else moves)
    api = pipeline.start_api()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    image = samples.jpeg(64, 48)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: upload(pipeline, image, owner="o", key=key), range(500)))
    assert len(set(ids)) == 500
    assert pipeline.queue_depth() == 500
    # When the API is SIGKILLed in the middle of erasing them
    [gunicorn_worker] = children(api.process.pid)
    tombstones = os.path.join(pipeline.root, "tombstones")
    answer = []
    request = threading.Thread(target=lambda: answer.append(
        _quietly(lambda: delete(pipeline, "/owners/o/jobs", key))))
    request.start()
    deadline = time.monotonic() + 60
    while len(os.listdir(tombstones)) < 50 and time.monotonic() < deadline:
        pass
    os.kill(gunicorn_worker, signal.SIGKILL)
    laid_at_kill = len(os.listdir(tombstones))
    api.kill_tree()
    request.join(60)
    assert answer and not isinstance(answer[0], requests.Response), \
        f"the erasure answered before the kill: {answer} ({laid_at_kill} tombstones)"
    # Then the sweep finishes it: all 500 gone, job.deleted for each
    swept = pipeline.cli("sweep", "--older-than", "0", check=False)
    assert swept.returncode == 0, swept.stderr
    left = files_of(pipeline.root, ids)
    assert not left, (f"{len(left)} of 500 jobs still have files after the sweep "
                        f"({laid_at_kill} tombstones when the API was killed); e.g. "
                        f"{next(iter(left.items()))}\n{swept.stderr}")
    events.read(lambda seen: {body["id"] for key, body in seen if key == "job.deleted"}
                >= set(ids), timeout=30)
    announced = {body["id"] for body in events.deleted(ids)}
    assert announced >= set(ids), f"{len(set(ids) - announced)} of 500 without job.deleted"
    assert all(body == {"id": body["id"], "owner": "o", "reason": "request"}
               for body in events.deleted(ids))
    events.close()


def _quietly(call):
    try:
        return call()
    except requests.RequestException as error:
        return error


# -- who may erase, and what is answered ----------------------------------------------

def test_delete_needs_a_key_of_scope_delete_and_answers_404_and_410(pipeline):
    pipeline.start_api()
    nginx = pipeline.start_nginx()
    worker = pipeline.start_worker()
    events = Events(pipeline)
    uploader = pipeline.add_key("app", "upload")
    ops = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, small_jpeg(), owner="x", key=uploader)
    assert pipeline.wait_job(job_id)["state"] == "done"
    urls = [nginx.base_url + Storage(pipeline.root).rendition_url(job_id, rendition)
            for rendition in pipeline.renditions]
    assert [requests.get(url, timeout=10).status_code for url in urls] == [200] * len(urls)

    for path in (f"/jobs/{job_id}", "/owners/x/jobs"):
        for base in (pipeline.base_url, nginx.base_url):
            missing = delete(pipeline, path, base_url=base)
            assert (missing.status_code, missing.json()["reason"]) == (401, "missing"), path
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            invalid = delete(pipeline, path, "iwk_" + "0" * 40, base_url=base)
            assert (invalid.status_code, invalid.json()["reason"]) == (401, "invalid"), path
            scope = delete(pipeline, path, uploader, base_url=base)
            assert (scope.status_code, scope.json()["reason"]) == (403, "scope"), path
    assert len(files_of(pipeline.root, [job_id])[job_id]) >= 5     # all still there

    for unknown in (new_job_id(), "not-a-job-id"):
        answer = delete(pipeline, f"/jobs/{unknown}", ops)
        assert answer.status_code == 404 and answer.json()["error"], answer.text
    # through nginx, as an app would
    erased_ok(delete(pipeline, f"/jobs/{job_id}", ops, base_url=nginx.base_url), job_id)
    nothing_of(pipeline, job_id)
    assert [requests.get(url, timeout=10).status_code for url in urls] == [404] * len(urls)
    gone = requests.get(f"{nginx.base_url}/jobs/{job_id}", timeout=10)
    assert gone.status_code == 410 and gone.json()["error"]
    twice = delete(pipeline, f"/jobs/{job_id}", ops)
    assert twice.status_code == 410 and twice.json()["error"], twice.text
    api_log = pipeline.services[0].log()
    assert " ERROR " not in api_log and "Traceback" not in api_log, api_log
    settle(pipeline, worker)
    events.assert_deleted_last(job_id, "x")
    assert [key for key, body in events.seen if body.get("id") == job_id] == \
        ["job.done", "job.deleted"]
    events.close()


# -- erasures that meet a job at an awkward moment ------------------------------------

def test_a_job_that_ends_while_its_erasure_waits_for_the_lock_leaves_nothing(pipeline):
    """The erasure reads the record (to learn its owner and when it ended)
    before it takes the job's lock; a worker that writes `done` in between
    enters the job in the ended index, which the tombstone does not name."""
    pipeline.start_api()
    worker = pipeline.start_worker()
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, big_jpeg(), owner="x", key=key)
    renderer = stopped_mid_render(pipeline, worker, job_id)
    directory = os.path.join(pipeline.root, "renditions", job_id)
    answer = []
    # the worker held still while its renderer stages the renditions (the
    # renderer takes the job's lock for that, so the test may not hold it yet)
    worker.signal(signal.SIGSTOP)
    os.kill(renderer, signal.SIGCONT)
    wait_until(lambda: os.path.isdir(directory) and len(os.listdir(directory)) == 3,
               "the renderer to stage the renditions")
    # then the test holds the job's lock, as a worker committing it would
    with Storage(pipeline.root)._locks.held(job_id):
        worker.signal(signal.SIGCONT)
        time.sleep(0.3)             # the worker waits for the lock to commit them
        request = threading.Thread(target=lambda: answer.append(
            delete(pipeline, f"/jobs/{job_id}", key)))
        request.start()
        time.sleep(1)               # the API waits for the lock too
        assert pipeline.read_job(job_id).ended is None
    request.join(30)
    erased_ok(answer[0], job_id)
    settle(pipeline, worker)
    nothing_of(pipeline, job_id)


def test_a_delete_retried_after_an_api_died_laying_the_tombstone_finishes_it(pipeline):
    """lay_tombstone creates ROOT/erasing/<id>, then the tombstone: an API
    killed between the two leaves the mark alone; the client retries."""
    pipeline.start_api()
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, small_jpeg(), owner="x", key=key)
    with open(os.path.join(pipeline.root, "erasing", job_id), "wb"):
        pass
    answer = delete(pipeline, f"/jobs/{job_id}", key)
    assert answer.status_code == 200, pipeline.services[0].log()[-1200:]
    erased_ok(answer, job_id)
    nothing_of(pipeline, job_id)


def test_a_tombstone_cut_short_by_a_kill_is_finished_by_the_sweep(pipeline):
    """lay_tombstone writes the tombstone with an O_EXCL create and then its
    bytes: an API SIGKILLed between the two leaves an empty tombstone (seen
    in the kill -9 test above), which the sweep must still finish."""
    pipeline.start_api()
    events = Events(pipeline)
    key = pipeline.add_key("ops", "upload,delete")
    job_id = upload(pipeline, small_jpeg(), owner="x", key=key)
    for part in ("erasing", "tombstones"):
        with open(os.path.join(pipeline.root, part, job_id), "wb"):
            pass
    swept = pipeline.cli("sweep", "--older-than", "0", check=False)
    assert swept.returncode == 0, swept.stderr[-1500:]
    nothing_of(pipeline, job_id)
    assert events.read(lambda seen: events.deleted([job_id]), timeout=5) and \
        events.deleted([job_id])
    events.close()


def test_an_owner_erasure_nginx_stops_waiting_for_goes_on_and_nginx_says_so(pipeline):
    # Given an owner's three queued jobs, a write of one of them holding its
    # lock for 3 s, and nginx waiting 1 s for an owner's erasure (300 s as
    # shipped: what a very large owner's takes)
    pipeline.start_api()
    nginx = pipeline.start_nginx(erasure_wait="1s")
    key = pipeline.add_key("ops", "upload,delete")
    ids = [upload(pipeline, small_jpeg(), owner="carol", key=key) for _ in range(3)]
    locked, release = threading.Event(), threading.Event()

    def write_in_progress():
        with Storage(pipeline.root)._locks.held(ids[0]):
            locked.set()
            release.wait(3)
    holder = threading.Thread(target=write_in_progress)
    holder.start()
    assert locked.wait(10)
    # When the owner is erased through nginx
    answer = delete(pipeline, "/owners/carol/jobs", key, base_url=nginx.base_url)
    # Then nginx answers 503 saying the erasure goes on, not that the API is down
    assert answer.status_code == 503, answer.text
    assert "goes on" in answer.json()["error"] and answer.headers["Retry-After"] == "60"
    release.set()
    holder.join()
    # and it does go on: every file of the three goes, and asked again
    # once it is over, the answer is 200 with nothing left to erase
    wait_until(lambda: not files_of(pipeline.root, ids), "the erasure to finish")
    nothing_of(pipeline, *ids)
    again = delete(pipeline, "/owners/carol/jobs", key, base_url=nginx.base_url)
    assert again.status_code == 200 and again.json() == {"owner": "carol", "erased": 0}
