"""[retention] applied by `imgworker gc`, with a clock the test controls
(--now): it removes exactly what is past each period, keeps the renditions
of a job whose original it removed, erases with job.deleted (reason
retention), and reads only the hours that may have expired."""

import json
import os
import time

import pika
import requests

from harness import samples
from imgworker import broker

DAY = 86400


def _events(pipeline):
    connection = pika.BlockingConnection(pika.URLParameters(pipeline.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, broker.EVENTS_EXCHANGE, routing_key="job.*")

    def received():
        found = []
        while True:
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((method.routing_key, json.loads(body)))
    return connection, received


def _gc(pipeline, now):
    pipeline.cli("gc", "--now", repr(now))


def files_of(root, job_id):
    found = []
    for directory, dirs, files in os.walk(root):
        if os.path.basename(directory) == "tombstones":
            continue
        found += [os.path.relpath(os.path.join(directory, name), root)
                  for name in files + dirs if job_id in name]
    return sorted(found)


def test_gc_removes_exactly_what_is_past_each_period_and_keeps_a_done_jobs_renditions(
        make_pipeline):
    pipeline = make_pipeline(retention={"originals": "1d", "renditions": "3d", "failed": "2d"})
    pipeline.start_api()
    pipeline.start_worker()
    connection, events = _events(pipeline)
    try:
        first = pipeline.upload(samples.jpeg(320, 240)).json()["id"]
        pipeline.wait_job(first)
        time.sleep(1.5)
        second = pipeline.upload(samples.jpeg(320, 240)).json()["id"]
        broken = pipeline.upload(data=samples.truncated_jpeg(),
                                 headers={"Content-Type": "image/jpeg"}).json()["id"]
        assert pipeline.wait_job(second)["state"] == "done"
        assert pipeline.wait_job(broken)["state"] == "failed"
        ended = {job_id: pipeline.read_job(job_id).ended for job_id in (first, second, broken)}
        assert ended[second] - ended[first] > 1
        events()                                        # the done and failed events

        # a day after the first ended, not the second: only its original goes
        _gc(pipeline, ended[first] + DAY + 0.5)
        assert not os.path.exists(os.path.join(pipeline.root, "originals", first))
        assert os.path.exists(os.path.join(pipeline.root, "originals", second))
        shown = pipeline.job(first)
        assert shown["state"] == "done" and "removed" in shown["original"]
        assert "removed" not in pipeline.job(second)["original"]
        for rendition in shown["renditions"].values():
            served = requests.get(pipeline.base_url + rendition["url"], timeout=10)
            assert served.status_code == 200 and served.content[:2] == b"\xff\xd8"

        # run again at the same time: nothing more
        _gc(pipeline, ended[first] + DAY + 0.5)
        assert os.path.exists(os.path.join(pipeline.root, "originals", second))

        # past both originals' day, and the failed job's two days: it is erased
        _gc(pipeline, ended[broken] + 2 * DAY + 0.5)
        assert not os.path.exists(os.path.join(pipeline.root, "originals", second))
        assert files_of(pipeline.root, broken) == []
        assert requests.get(f"{pipeline.base_url}/jobs/{broken}", timeout=10).status_code == 410
        assert files_of(pipeline.root, first) != [] and files_of(pipeline.root, second) != []

        # three days after the first ended: it is erased, the second is not
        _gc(pipeline, ended[first] + 3 * DAY + 0.5)
        assert files_of(pipeline.root, first) == []
        assert requests.get(f"{pipeline.base_url}/jobs/{first}", timeout=10).status_code == 410
        assert pipeline.job(second)["state"] == "done"
        got = events()
        assert sorted(got, key=lambda event: event[1]["id"]) == sorted(
            [("job.deleted", {"id": job_id, "owner": None, "reason": "retention"})
             for job_id in (broken, first)], key=lambda event: event[1]["id"])

        _gc(pipeline, ended[second] + 3 * DAY + 0.5)
        assert files_of(pipeline.root, second) == []
        assert os.listdir(os.path.join(pipeline.root, "ended")) == []
    finally:
        connection.close()


def test_forever_keeps_everything_and_gc_reads_only_the_hours_that_may_have_expired(
        make_pipeline):
    pipeline = make_pipeline(retention={"originals": "forever", "renditions": "forever",
                                        "failed": "forever"})
    pipeline.start_api()
    pipeline.start_worker()
    job_id = pipeline.upload(samples.jpeg(320, 240)).json()["id"]
    pipeline.wait_job(job_id)
    before = files_of(pipeline.root, job_id)
    _gc(pipeline, time.time() + 3650 * DAY)
    assert files_of(pipeline.root, job_id) == before
    assert json.loads(open(os.path.join(pipeline.root, "gc.json")).read()) == {}

    # with periods, a run's progress moves on; a later run starts from there
    from imgworker import config, retention
    settings = config.load(pipeline.config_path)
    settings.retention.originals = DAY
    now = time.time()
    read = retention.collect(settings, now=now + 10 * DAY).hours["originals"]
    assert read == 1                                    # the one hour with a job in it
    assert retention.collect(settings, now=now + 10 * DAY + 3600).hours["originals"] == 0
