"""`imgworker dlq list | replay | purge` against a real broker, run as an
operator runs them."""

import datetime
import json
import os
import subprocess
import sys
import time
import uuid

import pika

from imgworker import broker
from imgworker.job import State
from imgworker.storage import Storage
from harness import samples
from harness.pipeline import REPO


def dlq(pipeline, *args):
    return subprocess.run([sys.executable, "-m", "imgworker", "--config", pipeline.config_path,
                           "dlq", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def wait_dead_letters(pipeline, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(pipeline.dead_letters()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return pipeline.dead_letters()


def test_a_job_that_failed_for_a_reason_since_fixed_is_listed_replayed_and_done(pipeline):
    pipeline.start_api()
    job_id = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    # it fails: its original went missing (say, a restore from backup was pending)
    original = Storage(pipeline.root).original_path(job_id)
    os.rename(original, original + ".away")
    pipeline.start_worker()
    assert pipeline.wait_job(job_id)["state"] == "failed"
    assert wait_dead_letters(pipeline, 1) == [(job_id, "rejected")]

    listed = dlq(pipeline, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert (letter["id"], letter["reason"], letter["attempts"]) == \
        (job_id, "the uploaded original is missing from storage", 1)
    assert letter["since"].endswith("Z")
    assert pipeline.dead_letters() == [(job_id, "rejected")]     # listing left it there
    assert job_id in dlq(pipeline, "list").stdout

    # the reason is fixed, and the job replayed
    os.rename(original + ".away", original)
    replayed = dlq(pipeline, "replay", job_id)
    assert replayed.returncode == 0, replayed.stderr
    assert "1 jobs queued again" in replayed.stdout
    job = pipeline.wait_job(job_id)
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert sorted(job["renditions"]) == ["large", "medium", "thumb"]
    assert pipeline.read_job(job_id).last_error == "the uploaded original is missing from storage"
    assert pipeline.dead_letters() == []


def test_a_replay_cut_short_after_resetting_the_record_is_finished_by_the_next(pipeline):
    pipeline.start_api()
    pipeline.start_worker()
    job_id = pipeline.upload(data=samples.truncated_jpeg(),
                             headers={"Content-Type": "image/jpeg"}).json()["id"]
    assert pipeline.wait_job(job_id)["state"] == "failed"
    wait_dead_letters(pipeline, 1)
    # a replay that died after writing the record, before publishing
    storage = Storage(pipeline.root)
    job = storage.read_job(job_id)
    job.replay()
    storage.write_job(job)
    assert pipeline.dead_letters() == [(job_id, "rejected")]   # nothing lost meanwhile

    assert dlq(pipeline, "replay", "--all").returncode == 0
    # it is queued, taken again and (still truncated) fails again: one attempt
    deadline = time.monotonic() + 30
    while pipeline.read_job(job_id).state is not State.FAILED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (pipeline.read_job(job_id).state, pipeline.read_job(job_id).attempts) == \
        (State.FAILED, 1)


def test_purge_removes_dead_letters_older_than_asked_keeps_records_and_skips_nothing_else(
        pipeline):
    pipeline.start_api()
    pipeline.start_worker()
    ids = [pipeline.upload(data=samples.truncated_jpeg(),
                           headers={"Content-Type": "image/jpeg"}).json()["id"] for _ in range(2)]
    pipeline.publish_raw(b"not a job")
    assert len(wait_dead_letters_raw(pipeline, 3)) == 3

    replay_all = dlq(pipeline, "replay", "--all")
    listed = json.loads(dlq(pipeline, "list", "--json").stdout)
    assert [letter["id"] for letter in listed].count(None) == 1     # never replayed
    wait_dead_letters_raw(pipeline, 3)
    assert replay_all.returncode == 0

    kept = dlq(pipeline, "purge", "--older-than", "1h")
    assert (kept.returncode, kept.stdout.strip()) == (0, "0 dead letters removed")
    assert len(pipeline.dead_lettered()) == 3
    purged = dlq(pipeline, "purge")
    assert purged.stdout.strip() == "3 dead letters removed"
    assert pipeline.dead_lettered() == []
    assert all(pipeline.job(job_id)["state"] == "failed" for job_id in ids)


def wait_dead_letters_raw(pipeline, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(pipeline.dead_lettered()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return pipeline.dead_lettered()


def test_dlq_list_shows_dead_letters_of_any_bytes_as_not_a_job(pipeline):
    # Given bodies no JSON parser takes quietly, dead-lettered by some producer
    pipeline.start_api()                # declares the queues
    bodies = [b"[" * 100000, b"\xff\xfe\xfd not UTF-8", b'{"id": ' * 50000]
    connection, channel = pipeline._channel()
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("", pipeline.dead_letter_queue, body)
    connection.close()
    # When an operator lists the dead letters
    listed = dlq(pipeline, "list", "--json")
    # Then each is shown as not a job, and left in place
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [letter["id"] for letter in letters] == [None] * 3
    assert all(letter["reason"].startswith("not an imgworker job: ") for letter in letters)
    assert sorted(body for body, _reason in pipeline.dead_lettered()) == sorted(bodies)


def held(pipeline, queue):
    """(body, properties) of every message in a queue, left in place (what
    is got unacknowledged goes back when the connection closes); unlike
    pipeline.dead_lettered, it trusts no header."""
    connection, channel = pipeline._channel()
    try:
        gets = iter(lambda: channel.basic_get(queue), (None, None, None))
        return [(body, properties) for _method, properties, body in gets]
    finally:
        connection.close()


def test_crafted_dead_letters_are_listed_escaped_purged_by_age_only_if_dated_and_never_replayed(
        pipeline):
    # Given dead letters no RabbitMQ wrote: x-death a string, a time that is
    # an integer, reasons and bodies with terminal escapes, a nested body;
    # and one properly dated an hour ago
    pipeline.start_api()                # declares the queues
    an_hour_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    crafted = [
        (b"[" * 100000, None),
        (b"x-death as a string", {"x-death": "oops"}),
        (b"\x1b[31m red body", {"x-death": [{"reason": "\x1b[31mred", "time": 5}]}),
        (broker.job_message(uuid.uuid4().hex, "jpeg"),
         {"x-death": [{"reason": "\x1b]0;title\x07"}]}),
        (b"dated", {"x-death": [{"reason": "rejected", "time": an_hour_ago}]}),
    ]
    connection, channel = pipeline._channel()
    channel.confirm_delivery()
    for body, headers in crafted:
        channel.basic_publish("", pipeline.dead_letter_queue, body,
                              pika.BasicProperties(headers=headers, delivery_mode=2))
    connection.close()

    # When an operator lists them
    listed = dlq(pipeline, "list")
    as_json = dlq(pipeline, "list", "--json")
    # Then nothing crashes, and no control character reaches the terminal
    for run in (listed, as_json):
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        assert not any(ch in run.stdout + run.stderr for ch in "\x1b\x07\r")
    assert len(listed.stdout.splitlines()) == len(crafted)
    letters = json.loads(as_json.stdout)
    assert not any(ch in letter["reason"] for letter in letters for ch in "\x1b\x07")
    reasons = [letter["reason"] for letter in letters]
    assert reasons[1].endswith("; unreadable x-death header: 'oops'")
    assert reasons[2] == ("not an imgworker job: b'\\x1b[31m red body'; dead-lettered by "
                          "RabbitMQ ('\\x1b[31mred'); unreadable x-death time: 5")
    assert [letter["since"] is None for letter in letters] == [True] * 4 + [False]

    # an unknown age is never "older than": only the dated one is purged
    purged = dlq(pipeline, "purge", "--older-than", "1s")
    assert (purged.returncode, purged.stdout.strip()) == (0, "1 dead letters removed"), purged.stderr
    assert len(held(pipeline, pipeline.dead_letter_queue)) == 4

    # replay refuses each letter that is not a job, says why, and goes on
    replayed = dlq(pipeline, "replay", "--all")
    assert replayed.returncode == 0 and "Traceback" not in replayed.stderr, replayed.stderr
    assert "0 jobs queued again" in replayed.stdout
    assert replayed.stderr.count("is not a job, so it is not replayed") == 3
    assert "has no record" in replayed.stderr             # the job id nobody uploaded
    assert not any(ch in replayed.stderr for ch in "\x1b\x07")
    assert pipeline.queue_depth() == 0
    assert sorted(body for body, _ in held(pipeline, pipeline.dead_letter_queue)) == \
        sorted(body for body, _ in crafted[:4])

    # and a plain purge removes them all
    assert dlq(pipeline, "purge").stdout.strip() == "4 dead letters removed"
    assert held(pipeline, pipeline.dead_letter_queue) == []
