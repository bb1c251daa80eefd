"""`imgworker webhook` POSTs job events, signed, to a real HTTP receiver on
loopback that answers what each test scripts."""

import hashlib
import hmac
import http.server
import json
import signal
import threading
import time

import pika
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imgworker import webhook
from harness import samples

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
    time.sleep(1)
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
    deadline = time.monotonic() + 20
    while dead_webhooks(pipeline) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dead_webhooks(pipeline) == 1
    time.sleep(1)
    assert len(receiver.requests) == 3
    assert "failed 3 times (last: HTTP 500); dead-lettered to imgworker.webhooks.dead" \
        in sender.log()


def test_an_event_answered_410_is_given_up_at_once(webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([410])
    upload_and_finish(pipeline)
    receiver.wait(1)
    deadline = time.monotonic() + 20
    while dead_webhooks(pipeline) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
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
