"""A job's end is an event: the worker publishes it, confirmed, to the topic
exchange imgworker.events before it acknowledges the job; any service binds
a queue of its own to hear it."""

import json
import signal
import time

import pika
import pytest

from imgworker import broker
from imgworker.job import Job
from imgworker.storage import Storage, new_job_id
from harness import samples


@pytest.fixture
def events(pipeline):
    """A queue of the test's own bound to imgworker.events (as another
    service would bind one); yields a function returning what arrived, as
    [(routing key, parsed body)]."""
    pipeline.start_api()        # it declares the exchange
    connection = pika.BlockingConnection(pika.URLParameters(pipeline.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, broker.EVENTS_EXCHANGE, routing_key="job.*")

    def received(count, timeout=60):
        found = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.1)
                continue
            assert properties.delivery_mode == broker.PERSISTENT
            assert properties.content_type == "application/json"
            found.append((method.routing_key, json.loads(body)))
        return found
    yield received
    connection.close()


def test_a_good_and_a_bad_upload_end_in_exactly_a_done_and_a_failed_event(pipeline, events):
    pipeline.start_worker()
    good = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    bad = pipeline.upload(data=samples.truncated_jpeg(),
                          headers={"Content-Type": "image/jpeg"}).json()["id"]
    pipeline.wait_job(good)
    pipeline.wait_job(bad)
    got = dict((body["id"], (key, body)) for key, body in events(2))
    assert got == {good: ("job.done", pipeline.job(good)), bad: ("job.failed", pipeline.job(bad))}
    assert got[bad][1]["error"]
    assert events(1, timeout=2) == []          # and nothing more


def test_a_job_that_ended_before_its_event_went_out_gets_it_on_the_redelivery(pipeline, events):
    # Given a job whose worker wrote `done` and died before publishing the
    # event (and so before the ack): its message is still in the queue
    storage = Storage(pipeline.root)
    job_id = new_job_id()
    storage.save_original(job_id, samples.jpeg(400, 300))
    job = Job.accepted(job_id, "jpeg", 400, 300, 1)
    job.start("1")
    job.finish({}, 0.1)
    storage.write_job(job)
    pipeline.publish_raw(broker.job_message(job_id, "jpeg"))
    # When a worker gets the redelivery
    worker = pipeline.start_worker()
    # Then the event goes out, and the job is acknowledged
    assert events(1) == [("job.done", pipeline.job(job_id))]
    assert "already done; acknowledging the redelivery" in worker.log()
    # a message a stopped worker had not acknowledged would be back in the queue
    assert worker.stop() == 0
    assert pipeline.queue_depth() == 0


def test_workers_killed_mid_stream_leave_no_finished_job_without_its_event(pipeline, events):
    worker = pipeline.start_worker(1)
    ids = [pipeline.upload(samples.jpeg(1600, 1200)).json()["id"] for _ in range(30)]
    for round_ in range(6):
        # Not a wait for an event: the kill is to land wherever the worker
        # happens to be in the stream (a render, between an event and its ack)
        time.sleep(0.7)
        worker.signal(signal.SIGKILL)
        worker.process.wait()
        worker = pipeline.start_worker(round_ + 2)
    for job_id in ids:
        assert pipeline.wait_job(job_id)["state"] == "done"
    counts = {}
    for key, body in events(len(ids), timeout=30) + events(100, timeout=3):
        assert key == "job.done"
        counts[body["id"]] = counts.get(body["id"], 0) + 1
    # at least once each: a kill between the event and the ack repeats it
    assert set(counts) == set(ids), set(ids) - set(counts)
    assert all(1 <= n <= 2 for n in counts.values()), counts
