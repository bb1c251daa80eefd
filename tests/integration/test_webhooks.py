"""`imgworker webhook` POSTs job events, signed, to a real HTTP receiver on
loopback that answers what each test scripts."""

import hashlib
import hmac
import http.server
import json
import signal
import subprocess
import threading
import time

import pika
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imgworker import webhook
from harness import samples
from harness.pipeline import wait_until

SECRET = "test-secret-4f1c"


class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs with scripted statuses
    (the last one repeats), optionally after a delay; it records each
    request's headers and body."""

    def __init__(self, statuses, delay=0.0):
        self.statuses, self.delay, self.requests = list(statuses), delay, []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body, time.monotonic()))
                status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 \
                    else receiver.statuses[0]
                time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/imgworker"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.requests


def verified(headers, body):
    """What a receiver does (README): check the signature with the secret."""
    fields = dict(part.split("=", 1) for part in headers["Imgworker-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 300


@pytest.fixture
def webhook_pipeline(make_pipeline, amqp_url):
    """A pipeline whose webhook process POSTs to a Receiver; the webhook
    queues (fixed names) are emptied before and after."""
    def clear():
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        for queue in (webhook.QUEUE, webhook.DEAD_LETTER_QUEUE):
            channel.queue_delete(queue)
        connection.close()
    clear()
    made = []

    def make(statuses, delay=0.0, max_attempts=3):
        receiver = Receiver(statuses, delay)
        pipeline = make_pipeline(webhook={"url": receiver.url, "secret": SECRET,
                                          "retry_delay": "0.3", "timeout": "5",
                                          "max_attempts": str(max_attempts)})
        pipeline.start_api()
        pipeline.start_worker()
        sender = pipeline.start("webhook", "webhook")
        made.append(receiver)
        return pipeline, receiver, sender
    yield make
    for receiver in made:
        receiver.server.shutdown()
    clear()


def upload_and_finish(pipeline):
    job_id = pipeline.upload(samples.jpeg(640, 480)).json()["id"]
    assert pipeline.wait_job(job_id)["state"] == "done"
    return job_id


def dead_webhooks(pipeline):
    connection, channel = pipeline._channel()
    try:
        return channel.queue_declare(webhook.DEAD_LETTER_QUEUE, passive=True).method.message_count
    finally:
        connection.close()


def test_an_event_answered_500_twice_then_200_is_delivered_signed_on_the_third_attempt(
        webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([500, 500, 200])
    job_id = upload_and_finish(pipeline)
    posts = receiver.wait(3)
    assert len(posts) == 3
    headers, body, _ = posts[-1]
    assert headers["Imgworker-Event"] == "job.done"
    assert headers["Content-Type"] == "application/json"
    assert verified(headers, body)
    assert json.loads(body) == pipeline.job(job_id)
    assert all(post[1] == body for post in posts)              # the same event each time
    assert posts[1][2] - posts[0][2] < 10                # first retry within 10 s
    # once the sender has settled the event, no POST of it can follow
    sender.wait_notification("1 delivered, 0 dead-lettered")
    assert len(receiver.requests) == 3 and dead_webhooks(pipeline) == 0
    assert "delivered (HTTP 200, attempt 3)" in sender.log()
    assert not verified({**headers, "Imgworker-Signature": "t=1,v1=00"}, body)
    # and /metrics counts them, from the sender's process too
    scraped = {(sample.name, tuple(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(
                   requests.get(pipeline.base_url + "/metrics", timeout=10).text)
               for sample in family.samples}
    assert scraped[("imgworker_webhook_deliveries_total", (("outcome", "delivered"),))] == 1
    assert scraped[("imgworker_webhook_deliveries_total", (("outcome", "retried"),))] == 2


def test_an_event_always_answered_500_ends_in_the_dead_letter_queue_after_max_attempts(
        webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([500], max_attempts=3)
    upload_and_finish(pipeline)
    receiver.wait(3)
    sender.wait_notification("0 delivered, 1 dead-lettered")
    wait_until(lambda: dead_webhooks(pipeline), "the event in the dead-letter queue")
    assert (len(receiver.requests), dead_webhooks(pipeline)) == (3, 1)
    assert "failed 3 times (last: HTTP 500); dead-lettered to imgworker.webhooks.dead" \
        in sender.log()


def test_an_event_answered_410_is_given_up_at_once(webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([410])
    upload_and_finish(pipeline)
    receiver.wait(1)
    sender.wait_notification("0 delivered, 1 dead-lettered")
    wait_until(lambda: dead_webhooks(pipeline), "the event in the dead-letter queue")
    assert (len(receiver.requests), dead_webhooks(pipeline)) == (1, 1)
    assert "refused (HTTP 410); not retried" in sender.log()


def test_the_sender_killed_mid_delivery_loses_nothing(webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([200], delay=3)
    job_id = upload_and_finish(pipeline)
    receiver.wait(1)
    sender.signal(signal.SIGKILL)             # while the receiver is still answering
    sender.process.wait()
    receiver.delay = 0
    again = pipeline.start("webhook-again", "webhook")
    posts = receiver.wait(2)
    assert len(posts) == 2 and json.loads(posts[1][1])["id"] == job_id
    assert "delivered (HTTP 200, attempt 1)" in again.log()


def test_webhooks_are_off_without_a_url_and_the_unit_is_skipped_not_failed(pipeline):
    # ExecCondition= runs `imgworker webhook --configured`: 1 skips the unit
    assert pipeline.start("webhook-check", "webhook", "--configured",
                          ready=False).process.wait(30) == 1
    assert pipeline.start("webhook-off", "webhook", ready=False).process.wait(30) == 78


def declared_queues():
    """{name: (type, {argument: value})} as `rabbitmqctl list_queues` shows them."""
    listing = subprocess.run(["rabbitmqctl", "-s", "list_queues", "name", "type", "arguments",
                              "--formatter", "json"], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    return {queue["name"]: (queue["type"], {name: value for name, _type, value
                                            in queue["arguments"]})
            for queue in json.loads(listing)}


def test_quorum_webhook_queues_get_the_job_queues_delivery_limit_and_dead_lettering(
        webhook_pipeline, make_pipeline):
    # Given a quorum install with webhooks on (webhook_pipeline: its queues cleared)
    receiver = Receiver([200])
    pipeline = make_pipeline(broker={"queue_type": "quorum"},
                             webhook={"url": receiver.url, "secret": SECRET})
    pipeline.start_api()
    pipeline.start_worker()
    # When the sender starts
    pipeline.start("webhook", "webhook")
    # Then its queues are declared as the job queues are: quorum, the same
    # delivery limit and at-least-once dead-lettering, to its own dead letters
    declared = declared_queues()
    job_type, job_arguments = declared[pipeline.queue]
    webhook_type, webhook_arguments = declared[webhook.QUEUE]
    assert (job_type, webhook_type, declared[webhook.DEAD_LETTER_QUEUE][0]) == ("quorum",) * 3
    assert webhook_arguments == {**job_arguments,
                                 "x-dead-letter-routing-key": webhook.DEAD_LETTER_QUEUE}
    assert {name: webhook_arguments.get(name) for name in (
        "x-delivery-limit", "x-dead-letter-strategy", "x-overflow", "x-dead-letter-exchange")} \
        == {"x-delivery-limit": 20, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish", "x-dead-letter-exchange": ""}
    # And events are delivered
    job_id = upload_and_finish(pipeline)
    # (other tests' jobs on this broker may send their events to the same queue)
    wait_until(lambda: any(json.loads(body)["id"] == job_id
                           for _headers, body, _at in receiver.requests), "the job's event")
    receiver.server.shutdown()


def test_a_webhook_queue_an_older_version_declared_otherwise_is_used_as_it_is(
        webhook_pipeline, make_pipeline, amqp_url):
    # Given quorum webhook queues as an earlier imgworker declared them,
    # without the delivery limit (RabbitMQ refuses to redeclare them with it)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(webhook.DEAD_LETTER_QUEUE, durable=True,
                          arguments={"x-queue-type": "quorum"})
    older = {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
             "x-dead-letter-routing-key": webhook.DEAD_LETTER_QUEUE}
    channel.queue_declare(webhook.QUEUE, durable=True, arguments=older)
    connection.close()
    receiver = Receiver([200])
    pipeline = make_pipeline(broker={"queue_type": "quorum"},
                             webhook={"url": receiver.url, "secret": SECRET})
    pipeline.start_api()
    pipeline.start_worker()
    # When the upgraded sender starts
    sender = pipeline.start("webhook", "webhook")
    # Then it says so, keeps the queue, and delivers the events
    assert f"Queue {webhook.QUEUE} exists with other arguments" in sender.log()
    assert declared_queues()[webhook.QUEUE] == ("quorum", older)
    job_id = upload_and_finish(pipeline)
    # (other tests' jobs on this broker may send their events to the same queue)
    wait_until(lambda: any(json.loads(body)["id"] == job_id
                           for _headers, body, _at in receiver.requests), "the job's event")
    receiver.server.shutdown()
