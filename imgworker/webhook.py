"""``imgworker webhook`` (imgworker-webhook.service): every job event POSTed,
signed, to the one URL the operator configured.

It consumes a durable queue of its own, ``imgworker.webhooks``, bound to the
events exchange (``job.*``), so events wait there while the receiver -- or
this process -- is down. Each event is POSTed as it came (the JSON of GET
/jobs/<id>) with

    Imgworker-Event: job.done
    Imgworker-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">

A 2xx delivers it and the message is acknowledged. A connection error, a
timeout, 408, 429 or a 5xx is retried with the message in hand, after
[webhook] retry_delay doubling each time, up to [webhook] max_attempts; then,
and at once for any other answer (another 4xx, a redirect), the message is
rejected into ``imgworker.webhooks.dead`` with a log line saying why. Killed
mid-delivery, the message is unacknowledged and comes back: at-least-once,
like the events themselves. Redirects are not followed: only the configured
URL is ever called.

Only the events imgworker sends (``EVENTS``) are POSTed: a message on the
queue with any other routing key -- anyone with publish rights on the
exchange can send one -- is dead-lettered at once, the receiver never
called. ``[webhook] timeout`` bounds a whole attempt (connecting, sending,
and the answer's status line and headers), not each socket operation, so a
receiver trickling its answer cannot hold the sender.
"""

import hashlib
import hmac
import http.client
import logging
import signal
import socket
import threading
import time
import urllib.parse

import pika
import pika.exceptions

from . import broker, metrics, waits
from .job import State
from .storage import is_job_id

logger = logging.getLogger(__name__)

QUEUE = "imgworker.webhooks"
DEAD_LETTER_QUEUE = "imgworker.webhooks.dead"
#: The routing keys of the events imgworker publishes: a worker's, one per
#: finished state (broker.job_event), and an erasure's (broker.JOB_DELETED,
#: so the app deletes its copies); nothing else is sent to the receiver.
EVENTS = frozenset([f"job.{state.value}" for state in State if state.finished]
                   + [broker.JOB_DELETED])

#: Answers worth trying again: the receiver is busy or broken for now.
_RETRIED_STATUSES = {408, 429}
MAX_RETRY_DELAY = 600.0
#: The AMQP reply code of a declaration that differs from the queue's.
_PRECONDITION_FAILED = 406


def signature(secret, body, timestamp):
    """The Imgworker-Signature header's value for a body sent at timestamp."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


class Retry(Exception):
    """This attempt failed in a way worth repeating."""


class GiveUp(Exception):
    """The receiver refused the event for good."""


def post(config, event, body):
    """One delivery attempt; returns the status, or raises Retry or GiveUp."""
    url = urllib.parse.urlsplit(config.webhook.url)
    connection_class = http.client.HTTPSConnection if url.scheme == "https" \
        else http.client.HTTPConnection
    timeout = config.webhook.timeout
    deadline = time.monotonic() + timeout
    connection = connection_class(url.hostname, url.port, timeout=timeout)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": "imgworker-webhook",
               "Imgworker-Event": event,
               "Imgworker-Signature": signature(config.webhook.secret, body, int(time.time()))}
    watchdog = None
    try:
        connection.connect()
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("connecting took the whole timeout")
        connection.sock.settimeout(left)
        # The socket's timeout bounds each read, not the answer: cut the
        # connection at the deadline, however slowly the bytes come.
        watchdog = threading.Timer(left, _cut, (connection.sock,))
        watchdog.start()
        connection.request("POST", path, body, headers)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as error:
        if time.monotonic() >= deadline:
            raise Retry(f"no answer within {timeout:g} s ([webhook] timeout)") from None
        raise Retry(f"{type(error).__name__}: {error}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        connection.close()
    if 200 <= status < 300:
        return status
    if status in _RETRIED_STATUSES or status >= 500:
        raise Retry(f"HTTP {status}")
    raise GiveUp(f"HTTP {status}")


def _cut(sock):
    """End a POST that outlived its deadline: the reads and writes blocked
    on the socket return at once (a shutdown, not a close, is safe from
    another thread; the SSL layer, if any, is bypassed on purpose)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass        # closed meanwhile: the POST ended by itself


def declare(connection, config):
    """The webhook queue, bound to the events, and its dead-letter queue,
    declared as the job queues are (broker.queue_arguments: of [broker]
    queue_type; quorum ones with the delivery limit and at-least-once
    dead-lettering).

    A queue that exists with other arguments is used as it is, with a
    warning: RabbitMQ does not change a queue's arguments in place, and
    refuses the declaration (PRECONDITION_FAILED). Quorum webhook queues
    declared before they had the job queues' arguments are such queues."""
    channel = connection.channel()
    broker.declare_topology(channel, config)
    events, dead = broker.queue_arguments(config, dead_letter_queue=DEAD_LETTER_QUEUE)
    for queue, wanted in ((DEAD_LETTER_QUEUE, dead), (QUEUE, events)):
        try:
            channel.queue_declare(queue, durable=True, arguments=wanted)
        except broker.Refused as error:
            if error.reply_code != _PRECONDITION_FAILED:
                raise
            logger.warning("Queue %s exists with other arguments than imgworker declares "
                           "now (%s); it is used as it is.", queue, error.reply_text)
            channel = connection.channel()      # the refusal closed the last one
    channel.queue_bind(QUEUE, broker.EVENTS_EXCHANGE, routing_key="job.*")
    channel.close()


class WebhookSender:
    def __init__(self, config, notifier):
        self.config = config
        self.notifier = notifier
        self._stop_requested = False
        self.delivered = self.dead = 0

    def _on_signal(self, _signum, _frame):
        self._stop_requested = True

    def run(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff, ready = 1.0, False
        while not self._stop_requested:
            try:
                connection = pika.BlockingConnection(broker.parameters(self.config, "webhook"))
                try:
                    declare(connection, self.config)
                    channel = connection.channel()
                    channel.basic_qos(prefetch_count=1)
                    logger.info("Sending events from %s to %s.", QUEUE, self.config.webhook.url)
                    if not ready:
                        self.notifier.ready(self._status())
                        ready = True
                    backoff = 1.0
                    self._consume(connection, channel)
                finally:
                    if connection.is_open:
                        connection.close()
            except (pika.exceptions.AMQPError, OSError) as error:
                if self._stop_requested:
                    break
                broker.report_lost(error, backoff, self.notifier)
                self._sleep(None, backoff)
                backoff = min(backoff * 2, broker.MAX_RECONNECT_BACKOFF)
        self.notifier.stopping(f"Stopped after {self.delivered} events delivered.")
        return 0

    def _status(self):
        return f"Sending events; {self.delivered} delivered, {self.dead} dead-lettered."

    def _consume(self, connection, channel):
        for method, properties, body in channel.consume(QUEUE, inactivity_timeout=waits.TICK):
            if self._stop_requested:
                break
            if method is None:
                continue
            if self._deliver(connection, method.routing_key, properties, body):
                channel.basic_ack(method.delivery_tag)
            elif self._stop_requested:
                channel.basic_nack(method.delivery_tag, requeue=True)   # sent again later
                break
            else:
                channel.basic_reject(method.delivery_tag, requeue=False)
            self.notifier.status(self._status())
        channel.cancel()

    def _deliver(self, connection, event, properties, body):
        """True once delivered; False to dead-letter (or, when stopping, to
        hand back)."""
        job = properties.message_id or "?"
        if event not in EVENTS:
            logger.error("Webhook: a message routed %r (job %r) is not an event imgworker sends "
                         "(%s); the receiver is not called, dead-lettered to %s.",
                         event, job, ", ".join(sorted(EVENTS)), DEAD_LETTER_QUEUE)
            metrics.count_webhook("dead")
            self.dead += 1
            return False
        delay = self.config.webhook.retry_delay
        for attempt in range(1, self.config.webhook.max_attempts + 1):
            try:
                status = post(self.config, event, body)
            except GiveUp as error:
                logger.error("Webhook: %s for job %s refused (%s); not retried, "
                             "dead-lettered to %s.", event, job, error, DEAD_LETTER_QUEUE)
                metrics.count_webhook("dead")
                self.dead += 1
                return False
            except Retry as error:
                if attempt == self.config.webhook.max_attempts:
                    logger.error("Webhook: %s for job %s failed %d times (last: %s); "
                                 "dead-lettered to %s.", event, job, attempt, error,
                                 DEAD_LETTER_QUEUE)
                    metrics.count_webhook("dead")
                    self.dead += 1
                    return False
                logger.warning("Webhook: %s for job %s, attempt %d failed (%s); again in %g s.",
                               event, job, attempt, error, delay)
                metrics.count_webhook("retried")
                if not self._sleep(connection, delay):
                    return False
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            logger.info("Webhook: %s for job %s delivered (HTTP %d, attempt %d).",
                        event, job, status, attempt)
            metrics.count_webhook("delivered")
            self.delivered += 1
            return True
        return False

    def _sleep(self, connection, seconds):
        """Wait, keeping the connection's heartbeats going; False if asked
        to stop meanwhile."""
        return waits.pause(seconds, lambda: self._stop_requested,
                           sleep=time.sleep if connection is None else connection.sleep)


def forget_erased(config, storage):
    """Remove from imgworker.webhooks.dead every event of an erased job but
    its job.deleted; returns how many were removed. Run by imgworker sweep.

    An event the sender gave up on is a copy of the job: a job.done names
    the owner and the renditions. Left there after the job was erased, it
    keeps what the erasure removed, and moved back to imgworker.webhooks by
    an operator it would be POSTed after the job.deleted, telling the app
    of renditions it has just been told to delete. A dead-lettered
    job.deleted stays: it is the notice the app has not had yet.

    One pass over the queue, each message held unacknowledged until the
    connection closes, which returns what was not removed in its order:
    the cost grows with the dead letters, not with the storage."""
    connection = broker.connect(config, "sweep")
    removed = 0
    try:
        channel = connection.channel()
        try:
            channel.queue_declare(DEAD_LETTER_QUEUE, passive=True)
        except broker.Refused:          # webhooks were never on with this broker
            return 0
        while True:
            method, properties, _body = channel.basic_get(DEAD_LETTER_QUEUE)
            if method is None:
                return removed
            job_id = properties.message_id
            if _sent_as(properties.headers) != broker.JOB_DELETED and is_job_id(job_id) \
                    and storage.is_erased(job_id):
                channel.basic_ack(method.delivery_tag)
                removed += 1
    finally:
        try:
            connection.close()
        except broker.BrokerUnavailable:
            pass        # lost: the broker returns what was held all the same


def _sent_as(headers):
    """The routing key a dead letter was published with, from the x-death
    header RabbitMQ adds (the queue dead-letters with a routing key of its
    own); None if that is not there as RabbitMQ writes it."""
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    death = deaths[0] if isinstance(deaths, list) and deaths else None
    keys = death.get("routing-keys") if isinstance(death, dict) else None
    key = keys[0] if isinstance(keys, list) and keys else None
    return key.decode(errors="replace") if isinstance(key, bytes) else key
