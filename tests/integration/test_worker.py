"""The worker's promises: failures end with a reason, crashes are redelivered,
SIGTERM drains, and systemd hears READY/STATUS/WATCHDOG/STOPPING."""

import os
import signal
import time

import pytest

from imgworker.storage import Storage
from harness import samples

#: A rendition slow enough (several seconds: a 24 MP lossless-ish WebP) that
#: a test can catch the worker in the middle of it.
SLOW = {"renditions": {"huge": "6000x6000 fit webp 100", "small": "300x300 fit jpeg 80"}}


@pytest.fixture(scope="module")
def big_jpeg():
    return samples.jpeg(6000, 4000, quality=92)


def wait_processing(pipeline, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pipeline.job(job_id)["state"] == "processing":
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never started: {pipeline.job(job_id)}")


def slow_job_in_hand(make_pipeline, big_jpeg, **sections):
    """A pipeline whose one worker is in the middle of a slow job."""
    pipeline = make_pipeline(**SLOW, **sections)
    pipeline.start_api()
    worker = pipeline.start_worker(1)
    job_id = pipeline.upload(big_jpeg).json()["id"]
    wait_processing(pipeline, job_id)
    return pipeline, worker, job_id


def test_a_truncated_jpeg_ends_failed_in_one_attempt_and_sits_in_the_dead_letter_queue(pipeline):
    pipeline.start_api()
    worker = pipeline.start_worker()
    # The header is intact, so the API accepts it; the pixels are not there.
    response = pipeline.upload(samples.truncated_jpeg())
    assert response.status_code == 202
    job_id = response.json()["id"]
    job = pipeline.wait_job(job_id)
    assert job["state"] == "failed"
    assert job["attempts"] == 1
    assert job["error"].startswith("the image cannot be processed: the jpeg data cannot be decoded")
    assert "truncated" in job["error"]
    assert "renditions" not in job
    assert pipeline.dead_letters() == [(job_id, "rejected")]
    assert pipeline.queue_depth() == 0
    # And the worker lives on and takes the next job
    good = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    assert pipeline.wait_job(good)["state"] == "done"
    assert worker.process.poll() is None
    assert f"job {job_id}: failed: the image cannot be processed" in worker.log()


def test_a_job_whose_worker_is_killed_midway_is_redelivered_and_finished_once(make_pipeline, big_jpeg):
    pipeline, first, job_id = slow_job_in_hand(make_pipeline, big_jpeg)
    # When the worker dies hard in the middle of the job
    first.signal(signal.SIGKILL)
    first.process.wait()
    assert pipeline.job(job_id)["state"] == "processing"
    # Then another worker gets the same message and finishes it
    second = pipeline.start_worker(2)
    job = pipeline.wait_job(job_id, timeout=90)
    assert job["state"] == "done", job
    assert job["attempts"] == 2
    assert (job["renditions"]["huge"]["width"], job["renditions"]["huge"]["height"]) == (6000, 4000)
    assert "processing (attempt 2 of 3, redelivered)" in second.log()
    assert second.log().count(f"job {job_id}: done") == 1
    assert pipeline.queue_depth() == 0 and pipeline.dead_letters() == []


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_after_max_attempts(make_pipeline,
                                                                                   big_jpeg):
    pipeline = make_pipeline(worker={"max_attempts": "1"}, **SLOW)
    pipeline.start_api()
    job_id = pipeline.upload(big_jpeg).json()["id"]
    first = pipeline.start_worker(1)
    wait_processing(pipeline, job_id)
    first.signal(signal.SIGKILL)
    first.process.wait()
    second = pipeline.start_worker(2)
    job = pipeline.wait_job(job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith("gave up after 1 attempts")
    assert pipeline.dead_letters() == [(job_id, "rejected")]
    assert second.process.poll() is None


def test_sigterm_finishes_and_acks_the_job_in_hand_then_exits_0(make_pipeline, big_jpeg):
    pipeline, worker, job_id = slow_job_in_hand(make_pipeline, big_jpeg)
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0
    job = pipeline.job(job_id)
    assert job["state"] == "done" and job["attempts"] == 1
    assert pipeline.queue_depth() == 0
    worker.wait_notification("STOPPING=1", timeout=1)


def test_a_second_sigterm_exits_at_once_and_the_job_goes_back_to_the_queue(make_pipeline, big_jpeg):
    pipeline, worker, job_id = slow_job_in_hand(make_pipeline, big_jpeg)
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    assert worker.process.wait(10) == -signal.SIGTERM
    assert time.monotonic() - started < 2
    assert pipeline.job(job_id)["state"] == "processing"
    deadline = time.monotonic() + 10
    while pipeline.queue_depth() != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pipeline.queue_depth() == 1


def test_systemd_hears_ready_status_watchdog_and_stopping(pipeline):
    pipeline.start_api()        # which marks the storage as the API's: see test_shared_storage.py
    worker = pipeline.start_worker(env={"WATCHDOG_USEC": "2000000"})
    ready = worker.wait_notification("READY=1")
    assert "STATUS=Waiting for jobs; 0 done, 0 failed." in ready
    # WATCHDOG_USEC=2 s: pings at least every second
    pings = [m for m in worker.read_notifications(2.5) if m == "WATCHDOG=1"]
    assert len(pings) >= 2
    job_id = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    assert pipeline.wait_job(job_id)["state"] == "done"
    worker.wait_notification(f"STATUS=Processing job {job_id} (attempt 1).")
    worker.wait_notification("STATUS=Waiting for jobs; 1 done, 0 failed.")
    assert worker.stop() == 0
    worker.wait_notification("STOPPING=1", timeout=1)


def test_a_worker_that_cannot_reach_the_broker_never_says_ready(make_pipeline):
    pipeline = make_pipeline(broker={"url": "amqp://guest:guest@127.0.0.1:1/%2F"})
    Storage(pipeline.root).prepare(marker=True)     # an API ran on this storage before
    worker = pipeline.start_worker(ready=False)
    worker.wait_notification("STATUS=Waiting for the broker")
    worker.read_notifications(3)
    assert not any("READY=1" in m for m in worker.notifications)
    assert worker.process.poll() is None  # still trying, with backoff
    assert "Reconnecting in" in worker.log()
    assert worker.stop() == 0


def test_a_job_over_job_timeout_fails_with_that_reason_and_the_worker_goes_on(make_pipeline,
                                                                             big_jpeg):
    pipeline, worker, job_id = slow_job_in_hand(make_pipeline, big_jpeg, worker={"job_timeout": "1"})
    job = pipeline.wait_job(job_id, timeout=30)
    assert job["state"] == "failed"
    assert job["error"] == "rendering took longer than 1 s ([worker] job_timeout)"
    assert job["attempts"] == 1
    assert pipeline.dead_letters() == [(job_id, "rejected")]
    # the same worker process renders the next job in a fresh child
    small = pipeline.upload(samples.jpeg(300, 200)).json()["id"]
    assert pipeline.wait_job(small)["state"] == "done"
    assert worker.process.poll() is None


def test_a_renderer_killed_midway_costs_one_attempt_and_the_job_still_finishes(make_pipeline,
                                                                              big_jpeg):
    # As when the OOM killer or a decoder crash takes the rendering process
    pipeline, worker, job_id = slow_job_in_hand(make_pipeline, big_jpeg)
    os.kill(worker.busy_renderer_pid(), signal.SIGKILL)
    job = pipeline.wait_job(job_id, timeout=90)
    assert job["state"] == "done" and job["attempts"] == 2
    assert worker.process.poll() is None
    assert "the renderer process died (signal SIGKILL)" in worker.log()
    assert pipeline.queue_depth() == 0 and pipeline.dead_letters() == []


def test_a_job_that_crashes_every_renderer_is_dead_lettered_with_its_reason(make_pipeline, big_jpeg):
    pipeline, worker, job_id = slow_job_in_hand(make_pipeline, big_jpeg, worker={"max_attempts": "2"})
    os.kill(worker.busy_renderer_pid(), signal.SIGKILL)
    wait_attempt(pipeline, job_id, 2)
    os.kill(worker.busy_renderer_pid(), signal.SIGKILL)
    job = pipeline.wait_job(job_id, timeout=30)
    assert job["state"] == "failed"
    assert job["error"] == "gave up after 2 attempts: the renderer process died (signal SIGKILL)"
    assert pipeline.dead_letters() == [(job_id, "rejected")]
    assert worker.process.poll() is None   # the worker itself never died


def wait_attempt(pipeline, job_id, attempt, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = pipeline.job(job_id)
        if job["state"] == "processing" and job["attempts"] == attempt:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached attempt {attempt}: {pipeline.job(job_id)}")


@pytest.mark.parametrize("body", [b'{"id": 1}', b"null", b"[]", b"not json",
                                  b'{"id": "../../etc/passwd"}',
                                  b'{"id": "0123456789abcdef0123456789abcdef\\n"}'])
def test_a_malformed_message_is_dead_lettered_and_the_worker_takes_the_next_job(pipeline, body):
    # Given a worker, and a message on its queue that is not an imgworker job
    pipeline.start_api()
    worker = pipeline.start_worker()
    pipeline.publish_raw(body)
    # When a good job comes after it (it waits behind the bad one)
    good = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    # Then the good job is done, the bad message sits in the dead-letter
    # queue, and the worker lives on and says why
    assert pipeline.wait_job(good, timeout=30)["state"] == "done"
    assert pipeline.dead_lettered() == [(body, "rejected")]
    assert pipeline.queue_depth() == 0
    assert worker.process.poll() is None
    assert "Dead-lettering a message that is not an imgworker job" in worker.log()


def test_messages_no_parser_takes_quietly_are_dead_lettered_and_sigterm_still_stops_the_worker(
        pipeline):
    # Given a worker, and on its queue bodies that once stalled it for good
    # (a RecursionError left the delivery unsettled, and SIGTERM hung)
    pipeline.start_api()
    worker = pipeline.start_worker()
    bodies = [b"[" * 100000, b'{"id":' * 50000, b"\xff\xfe\xfd not UTF-8",
              b'{"id": "' + b"0" * (2 << 20) + b'"}']
    for body in bodies:
        pipeline.publish_raw(body)
    # When a good job comes after them
    good = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    # Then each is dead-lettered with the reason in the log, the good job is
    # done, and SIGTERM stops the worker within seconds
    assert pipeline.wait_job(good, timeout=30)["state"] == "done"
    assert sorted(pipeline.dead_lettered()) == sorted((body, "rejected") for body in bodies)
    assert worker.log().count("Dead-lettering a message that is not an imgworker job") == 4
    assert pipeline.queue_depth() == 0
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(5) == 0
    worker.wait_notification("STOPPING=1", timeout=1)
