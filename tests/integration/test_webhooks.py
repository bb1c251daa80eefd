"""`imgworker webhook` POSTs job events, signed, to a real HTTP receiver on
loopback that answers what each test scripts."""

import hashlib
import hmac
import http.server
import json
import select
import signal
import socketserver
import subprocess
import threading
import time
import uuid

import pika
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from imgworker import broker, webhook
from harness import samples
from harness.pipeline import wait_until
from tests.integration.test_dead_letters import held

SECRET = "test-secret-4f1c"


class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs with scripted statuses,
    each event (job id) its own script (the last status repeats), optionally
    after a delay; it records each request's headers and body. Other tests'
    jobs on this broker may send their events to the same queue
    (imgworker.webhooks): a test looks at its own job's (``ours``)."""

    def __init__(self, statuses, delay=0.0):
        self.statuses, self.delay, self.requests = list(statuses), delay, []
        self._scripts = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body, time.monotonic()))
                script = receiver._scripts.setdefault(event_id(body), list(receiver.statuses))
                status = script.pop(0) if len(script) > 1 else script[0]
                time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/imgworker"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ours(self, job_id):
        """The requests carrying this job's event."""
        return [request for request in self.requests if event_id(request[1]) == job_id]

    def wait(self, count, job_id, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.ours(job_id)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.ours(job_id)


def event_id(body):
    """The job id an event's body names (None if it names none)."""
    try:
        return json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None


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

    def make(statuses, delay=0.0, max_attempts=3, receiver=None, timeout=5):
        receiver = receiver or Receiver(statuses, delay)
        pipeline = make_pipeline(webhook={"url": receiver.url, "secret": SECRET,
                                          "retry_delay": "0.3", "timeout": str(timeout),
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


def test_an_event_answered_500_twice_then_200_is_delivered_signed_on_the_third_attempt(
        webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([500, 500, 200])
    job_id = upload_and_finish(pipeline)
    posts = receiver.wait(3, job_id)
    assert len(posts) == 3
    headers, body, _ = posts[-1]
    assert headers["Imgworker-Event"] == "job.done"
    assert headers["Content-Type"] == "application/json"
    assert verified(headers, body)
    assert json.loads(body) == pipeline.job(job_id)
    assert all(post[1] == body for post in posts)              # the same event each time
    assert posts[1][2] - posts[0][2] < 10                # first retry within 10 s
    # once the sender has settled the event, no POST of it can follow
    sender.wait_log(f"for job {job_id} delivered (HTTP 200, attempt 3)")
    assert len(receiver.ours(job_id)) == 3 and job_id not in dead_webhook_ids(pipeline)
    assert not verified({**headers, "Imgworker-Signature": "t=1,v1=00"}, body)
    # and /metrics counts them, from the sender's process too (as many as
    # its log tells: other tests' events may have come to it)
    scraped = {(sample.name, tuple(sample.labels.items())): sample.value
               for family in text_string_to_metric_families(
                   requests.get(pipeline.base_url + "/metrics", timeout=10).text)
               for sample in family.samples}
    told = sender.log()
    assert scraped[("imgworker_webhook_deliveries_total", (("outcome", "delivered"),))] == \
        told.count(" delivered (HTTP ") >= 1
    assert scraped[("imgworker_webhook_deliveries_total", (("outcome", "retried"),))] == \
        told.count("; again in ") >= 2


def test_an_event_always_answered_500_ends_in_the_dead_letter_queue_after_max_attempts(
        webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([500], max_attempts=3)
    job_id = upload_and_finish(pipeline)
    sender.wait_log(f"for job {job_id} failed 3 times (last: HTTP 500); dead-lettered to "
                    "imgworker.webhooks.dead")
    assert len(receiver.ours(job_id)) == 3 and job_id in dead_webhook_ids(pipeline)


def test_an_event_answered_410_is_given_up_at_once(webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([410])
    job_id = upload_and_finish(pipeline)
    sender.wait_log(f"for job {job_id} refused (HTTP 410); not retried")
    assert len(receiver.ours(job_id)) == 1 and job_id in dead_webhook_ids(pipeline)


def test_the_sender_killed_mid_delivery_loses_nothing(webhook_pipeline):
    pipeline, receiver, sender = webhook_pipeline([200], delay=3)
    job_id = upload_and_finish(pipeline)
    receiver.wait(1, job_id)
    sender.signal(signal.SIGKILL)             # while the receiver is still answering
    sender.process.wait()
    receiver.delay = 0
    again = pipeline.start("webhook-again", "webhook")
    assert len(receiver.wait(2, job_id)) == 2
    again.wait_log(f"for job {job_id} delivered (HTTP 200, attempt 1)")


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


class TrickleReceiver:
    """A receiver that reads the whole request, then answers 200 one byte
    every 0.5 s (only to the events of ``slow`` job ids, if given; at once
    to others); it records when each request came and when the client hung
    up."""

    ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self, slow=None):
        self.requests = []      # [came (monotonic), hung up (monotonic) or None, body]
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                length = 0
                for line in iter(self.rfile.readline, b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                seen = [time.monotonic(), None, self.rfile.read(length)]
                receiver.requests.append(seen)
                trickled = receiver.ANSWER if slow is None or event_id(seen[2]) in slow else b""
                if not trickled:
                    self.connection.sendall(receiver.ANSWER)
                for byte in trickled:
                    try:
                        self.connection.sendall(bytes([byte]))
                    except OSError:
                        break
                    readable, _, _ = select.select([self.connection], [], [], 0.5)
                    if readable and not self.connection.recv(1):
                        break
                seen[1] = time.monotonic()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/imgworker"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_post_answered_one_byte_at_a_time_is_given_up_at_the_timeout_and_dead_lettered(
        webhook_pipeline):
    # Given a receiver that trickles its answer to our event, one byte per
    # 0.5 s (the socket's own timeout never fires), and [webhook] timeout = 2
    job_id = uuid.uuid4().hex
    receiver = TrickleReceiver(slow={job_id})
    pipeline, _, sender = webhook_pipeline([], receiver=receiver, timeout=2, max_attempts=1)
    # When a job's event (ours, published here) is POSTed to it
    connection, channel = pipeline._channel()
    channel.confirm_delivery()
    channel.basic_publish(broker.EVENTS_EXCHANGE, "job.done", json.dumps({"id": job_id}).encode(),
                          pika.BasicProperties(message_id=job_id, delivery_mode=2))
    connection.close()
    ours = wait_until(lambda: [seen for seen in receiver.requests if seen[1] is not None
                               and event_id(seen[2]) == job_id], "the POST to end")
    # Then the sender hung up within the timeout (+1 s), and dead-lettered
    # the event as a timeout
    came, hung_up, _ = ours[0]
    assert hung_up - came < 2 + 1
    sender.wait_log(f"for job {job_id} failed 1 times (last: no answer within 2 s "
                    "([webhook] timeout)); dead-lettered to imgworker.webhooks.dead")
    assert job_id in dead_webhook_ids(pipeline)
    assert sender.process.poll() is None


def dead_webhook_ids(pipeline):
    """The message ids of the events in imgworker.webhooks.dead, left in place."""
    return [properties.message_id for _body, properties
            in held(pipeline, webhook.DEAD_LETTER_QUEUE)]


def test_an_event_with_a_routing_key_imgworker_never_sends_is_dead_lettered_unsent(
        webhook_pipeline):
    # Given a sender, and a message on the events exchange that matches
    # job.* but is no event of imgworker's, with a header injection in its key
    pipeline, receiver, sender = webhook_pipeline([200])
    crafted = f"crafted-{uuid.uuid4().hex}"
    connection, channel = pipeline._channel()
    channel.confirm_delivery()
    channel.basic_publish(broker.EVENTS_EXCHANGE, "job.x\r\nX-Injected: 1", b'{"id": "x"}',
                          pika.BasicProperties(message_id=crafted, delivery_mode=2))
    connection.close()
    # When it has been handled
    sender.wait_log(f"(job '{crafted}') is not an event imgworker sends")
    # Then it is dead-lettered, the receiver never saw it, and the sender
    # lives on and delivers the next real event
    wait_until(lambda: crafted in dead_webhook_ids(pipeline), "the crafted event dead-lettered")
    job_id = upload_and_finish(pipeline)
    wait_until(lambda: any(json.loads(body).get("id") == job_id
                           for _headers, body, _at in receiver.requests), "the job's event")
    assert not any("X-Injected" in headers or body == b'{"id": "x"}'
                   for headers, body, _at in receiver.requests)
    assert sender.process.poll() is None
    assert "Traceback" not in sender.log()


def dead_events(pipeline):
    """(routing key it was sent with, job id) of each event in
    imgworker.webhooks.dead, left in place."""
    connection, channel = pipeline._channel()
    try:
        gets = iter(lambda: channel.basic_get(webhook.DEAD_LETTER_QUEUE), (None, None, None))
        return sorted((properties.headers["x-death"][0]["routing-keys"][0],
                       properties.message_id) for _method, properties, _body in gets)
    finally:
        connection.close()


def test_the_sweep_removes_the_dead_lettered_events_of_an_erased_job_but_its_job_deleted(
        webhook_pipeline):
    # Given a receiver that refuses every event (410: dead-lettered at
    # once), and two done jobs whose job.done it refused
    pipeline, receiver, sender = webhook_pipeline([410])
    erased, kept = upload_and_finish(pipeline), upload_and_finish(pipeline)
    for job_id in (erased, kept):
        sender.wait_log(f"job.done for job {job_id} refused (HTTP 410)")
    # When one is erased (its job.deleted refused too) and the sweep runs
    assert json.loads(pipeline.cli("erase", erased).stdout)["erased"] == [erased]
    sender.wait_log(f"job.deleted for job {erased} refused (HTTP 410)")
    wait_until(lambda: ("job.deleted", erased) in dead_events(pipeline),
               "the job.deleted dead-lettered")
    swept = pipeline.cli("sweep")
    # Then the erased job's job.done is gone from the dead letters: nothing
    # there names its owner or renditions any more; its job.deleted, the
    # notice the app has not had, and the kept job's job.done stay
    assert dead_events(pipeline) == sorted([("job.deleted", erased), ("job.done", kept)])
    assert "1 webhook dead letters of erased jobs removed" in swept.stderr, swept.stderr
    # and a sweep after it finds nothing more to remove
    assert "0 webhook dead letters of erased jobs removed" in pipeline.cli("sweep").stderr
    assert dead_events(pipeline) == sorted([("job.deleted", erased), ("job.done", kept)])
