"""RabbitMQ: connection parameters, the queue topology, the confirmed publisher.

pika's exceptions stop here: callers see BrokerUnavailable, with a reason
(and Refused, the broker's answer to one call on a channel: see there).
The worker's consuming loop (worker.py) uses pika directly for its
connection but takes its parameters and topology from this module, so the
API and the workers always declare the same queues with the same arguments
(RabbitMQ refuses a redeclaration that differs).
"""

import contextlib
import json
import logging
import os
import random
import threading
import time

import pika
import pika.exceptions

from . import config as configuration
from .storage import is_job_id

logger = logging.getLogger(__name__)

#: AMQP delivery_mode 2: the broker writes the message to disk (with a
#: durable queue and publisher confirms, a 202 survives a broker restart).
PERSISTENT = 2

#: The durable topic exchange a job's end is published to, routing key
#: ``job.done`` or ``job.failed``, body the job as GET /jobs/<id> shows it
#: with its owner; and its erasure, ``job.deleted`` (erasure.py). Public
#: contract: other services bind their own queues to it.
EVENTS_EXCHANGE = "imgworker.events"
JOB_DELETED = "job.deleted"


class BrokerUnavailable(Exception):
    """The broker cannot take a message now (down, unreachable, blocked by a
    resource alarm, or it refused the message). Answer 503, retry later."""

    def __init__(self, reason, stale_connection=False):
        super().__init__(reason)
        #: The failure hit a connection made for an earlier request.
        self.stale_connection = stale_connection


def parameters(config, name):
    """Connection parameters from config, one per URL in [broker] url, for
    ``pika.BlockingConnection``, which tries them in turn until one answers.
    Shuffled, so the connections of many processes spread over a cluster's
    nodes. ``name`` shows in ``rabbitmqctl list_connections client_properties``."""
    every = []
    for url in configuration.split_urls(config.broker.url):
        params = pika.URLParameters(url)
        params.heartbeat = config.broker.heartbeat
        params.connection_attempts = 1
        # Bound every wait on the broker, so an API request never hangs:
        # connect (socket_timeout), the AMQP handshake (stack_timeout) and a
        # connection blocked by a memory or disk alarm
        # (blocked_connection_timeout). With several nodes, a connect may
        # wait that long for each node that does not answer.
        params.socket_timeout = config.broker.timeout
        params.stack_timeout = config.broker.timeout
        params.blocked_connection_timeout = config.broker.timeout
        params.client_properties = {"connection_name": f"imgworker {name} pid {os.getpid()}"}
        every.append(params)
    random.shuffle(every)
    return every


def connect(config, name):
    """A BlockingConnection for a command (status and /metrics, dlq,
    migrate-queues); BrokerUnavailable, with a reason, if no node answers.
    Its calls, and those of the channels it opens, raise BrokerUnavailable
    too when the connection is lost or the broker fails on the way: only a
    Refused passes (see there)."""
    with _translated():
        return _Translated(pika.BlockingConnection(parameters(config, name)))


#: The broker refused one call on a channel, and closed that channel (a
#: passive declare of a queue that does not exist, a redeclaration with
#: other arguments): its answer to the call, the connection is fine, so a
#: connection from ``connect`` lets it through. Catch it by this name.
Refused = pika.exceptions.ChannelClosedByBroker


@contextlib.contextmanager
def _translated():
    """pika's errors, and the socket's, as BrokerUnavailable (but Refused)."""
    try:
        yield
    except Refused:
        raise
    except pika.exceptions.AMQPError as error:
        raise BrokerUnavailable(describe(error)) from None
    except OSError as error:
        raise BrokerUnavailable(f"cannot reach the broker ({error})") from None


class _Translated:
    """A pika BlockingConnection, or one of its channels, whose calls raise
    BrokerUnavailable instead of pika's errors. What they return is pika's
    (a channel from ``channel()`` is wrapped as well)."""

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def __getattr__(self, name):
        attribute = getattr(self._wrapped, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            with _translated():
                result = attribute(*args, **kwargs)
            return _Translated(result) if name == "channel" else result
        return call

    def close(self):
        """Close, unless it is closed already: pika raises then, and in a
        ``finally`` that would hide why the connection was lost."""
        if self._wrapped.is_open:
            with _translated():
                self._wrapped.close()


#: A quorum queue dead-letters a message returned this many times even if
#: no worker's attempt count caught it (a worker killed before it wrote
#: one). Far above max_attempts, so the count on disk decides first; fixed,
#: because RabbitMQ refuses to redeclare a queue with other arguments.
QUORUM_DELIVERY_LIMIT = 20


def queue_arguments(config, queue_type=None, dead_letter_queue=None):
    """(queue, dead-letter queue) declare arguments for a queue type
    (default: config's [broker] queue_type): the job queues', and the
    webhook sender's with its own ``dead_letter_queue``."""
    dead_lettering = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key":
                      dead_letter_queue or config.broker.dead_letter_queue}
    if (queue_type or config.broker.queue_type) == "classic":
        return dead_lettering, {}
    quorum = {"x-queue-type": "quorum"}
    return {**quorum, **dead_lettering,
            # at-least-once dead-lettering needs reject-publish overflow
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
            "x-delivery-limit": QUORUM_DELIVERY_LIMIT}, quorum


def topology(config):
    """[(queue, declare arguments)] in the order to declare them: the
    durable dead-letter queue, which keeps failed jobs for a person to
    inspect (or shovel back), then the durable job queue that dead-letters
    to it."""
    jobs, dead = queue_arguments(config)
    return [(config.broker.dead_letter_queue, dead), (config.broker.queue, jobs)]


def declare_topology(channel, config):
    """Declare the topology on a pika BlockingChannel: the queues, and the
    events exchange."""
    for queue, arguments in topology(config):
        channel.queue_declare(queue, durable=True, arguments=arguments)
    channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)


def job_event(job):
    """(routing key, body, properties) of the event that says a job ended."""
    return (f"job.{job.state.value}", json.dumps(job.event()).encode(),
            pika.BasicProperties(delivery_mode=PERSISTENT, message_id=job.id,
                                 content_type="application/json"))


def job_message(job_id, fmt):
    return json.dumps({"id": job_id, "format": fmt}).encode()


def job_id_of(body):
    """The id of the job a message names (one job_message made), or None if
    the body is anything else. It never raises, whatever the bytes: any
    producer may put anything on the queue."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):    # not JSON, not UTF-8; nested too deep
        return None
    job_id = message.get("id") if isinstance(message, dict) else None
    return job_id if is_job_id(job_id) else None


#: Seconds a dropped publisher connection has to close with the broker.
_CLOSE_TIMEOUT = 1.0


class Publisher:
    """A connection with one confirmed channel, for one thread at a time
    (pika connections are not thread-safe; the API's threads share one
    through GroupPublisher).

    ``publish`` returns only once the broker has confirmed the message is
    stored (persistent, durable queue, publisher confirms, mandatory routing),
    and raises BrokerUnavailable otherwise -- within config.broker.timeout
    seconds for each step (connect, confirm), give or take one reconnect.

    It runs pika's asynchronous connection, not its BlockingConnection,
    because only that lets the wait for a confirm be bounded: a quorum queue
    that has lost its majority neither confirms nor refuses a message until
    a majority is back (a minute or more), and the client must hear 503 long
    before that. The I/O loop runs only while a call waits on the broker.
    """

    def __init__(self, config):
        self._config = config
        self._connection = None
        self._channel = None
        self._blocked = False
        self._outcome = None        # what ends the current wait
        self._published = 0         # delivery tags used on the channel so far
        self._unconfirmed = {}      # delivery tag -> message id, of the batch in flight
        self._returned = set()      # message ids of the batch no queue took
        self._nacked = set()        # message ids of the batch the broker refused

    # -- the wait: run I/O until a callback settles it, or time is up ------------
    def _wait(self, what, timeout=None):
        """Run the I/O loop until a callback calls _settle; return what it
        settled with. Raises BrokerUnavailable (and drops the connection)
        if the connection failed or ``what`` took over the timeout."""
        timeout = self._config.broker.timeout if timeout is None else timeout
        ioloop = self._connection.ioloop
        self._outcome = None
        timer = ioloop.call_later(timeout, lambda: self._settle(_TimedOut()))
        try:
            while self._outcome is None:
                ioloop.start()      # until _settle stops it
        finally:
            ioloop.remove_timeout(timer)
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, _TimedOut):
            self._drop()
            raise BrokerUnavailable(f"the broker did not {what} within {timeout:g} s")
        if isinstance(outcome, BaseException):
            # the connection or channel closed under us
            self._drop()
            raise BrokerUnavailable(describe(outcome), stale_connection=True)
        return outcome

    def _settle(self, outcome):
        if self._outcome is None:
            self._outcome = outcome
        self._connection.ioloop.stop()

    def _run_pending_io(self):
        """Take in what the broker sent meanwhile (heartbeats, blocked
        notices, a close) without waiting for anything."""
        ioloop = self._connection.ioloop
        ioloop.call_later(0, ioloop.stop)
        ioloop.start()

    # -- connection --------------------------------------------------------------
    def _connect(self):
        try:
            self._open()
        except BrokerUnavailable as error:
            raise BrokerUnavailable(str(error)) from None    # a fresh connection: not stale
        logger.info("Connected to the broker; queue %s declared.", self._config.broker.queue)

    def _open(self):
        failures = []
        for params in parameters(self._config, "api"):
            self._connection = pika.SelectConnection(
                params, on_open_callback=self._settle,
                on_open_error_callback=lambda _connection, error: self._settle(error),
                on_close_callback=self._on_connection_closed)
            try:
                self._wait("accept a connection")
                break
            except BrokerUnavailable as error:
                failures.append(str(error))
        else:
            self._connection = None
            raise BrokerUnavailable("; ".join(dict.fromkeys(failures)))
        self._blocked = False
        self._connection.add_on_connection_blocked_callback(self._on_blocked)
        self._connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._connection.channel(on_open_callback=self._settle)
        self._channel = self._wait("open a channel")
        self._channel.add_on_close_callback(lambda _channel, reason: self._settle(reason))
        self._channel.add_on_return_callback(self._on_returned)
        self._channel.confirm_delivery(self._on_confirm, callback=self._settle)
        self._wait("turn on publisher confirms")
        self._published, self._unconfirmed = 0, {}
        for queue, arguments in topology(self._config):
            self._channel.queue_declare(queue, durable=True, arguments=arguments,
                                        callback=self._settle)
            self._wait(f"declare queue {queue}")
        self._channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True,
                                       callback=self._settle)
        self._wait(f"declare exchange {EVENTS_EXCHANGE}")

    def _on_connection_closed(self, _connection, reason):
        self._settle(reason)

    def _on_blocked(self, _connection, _frame):
        logger.warning("The broker blocked publishing (a memory or disk alarm); "
                       "uploads get 503 until it clears.")
        self._blocked = True

    def _on_unblocked(self, _connection, _frame):
        logger.info("The broker unblocked publishing.")
        self._blocked = False

    def _on_returned(self, _channel, _method, properties, _body):
        self._returned.add(properties.message_id)   # unroutable; its confirm follows

    def _on_confirm(self, frame):
        """An ack or nack of one delivery tag, or of every one up to it."""
        method = frame.method
        tags = ([tag for tag in self._unconfirmed if tag <= method.delivery_tag]
                if method.multiple else [method.delivery_tag])
        for tag in tags:
            message_id = self._unconfirmed.pop(tag, None)
            if isinstance(method, pika.spec.Basic.Nack):
                self._nacked.add(message_id)
        if not self._unconfirmed:
            self._settle(True)

    def _drop(self):
        connection, self._connection, self._channel = self._connection, None, None
        if connection is None:
            return
        if not (connection.is_closing or connection.is_closed):
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass
        # Let the close reach the broker and the socket be released, for a
        # second at most. Other callbacks stop the loop on the way (the
        # channel's close comes first), so run it until the connection is
        # closed, not just once: a loop that stopped early left the
        # connection half closed, its socket open.
        self._connection = connection
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while not connection.is_closed and time.monotonic() < deadline:
            self._outcome = None
            timer = connection.ioloop.call_later(deadline - time.monotonic(),
                                                 connection.ioloop.stop)
            connection.ioloop.start()
            connection.ioloop.remove_timeout(timer)
        self._connection = self._outcome = None
        # Each SelectConnection runs an I/O loop of its own, which holds a
        # socket pair to wake itself, and only close() releases it: every
        # reconnect left three sockets behind until the garbage collector
        # found them (the soak's hour of 2026-12-02 saw two API processes
        # hold 2 and 4 more sockets for its last 15 minutes).
        connection.ioloop.close()

    def close(self):
        if self._connection is not None:
            self._drop()

    def _ensure_open(self):
        """Connect if needed and take in pending frames. Returns True if an
        existing connection was reused."""
        if self._connection is not None and self._connection.is_open:
            self._run_pending_io()
            if self._connection is not None and self._connection.is_open \
                    and self._channel.is_open:
                return True
        if self._connection is not None:
            self._drop()            # closed or closing: release its socket and I/O loop
        self._connect()
        return False

    def check(self):
        """Raise BrokerUnavailable unless the broker is reachable now."""
        self._ensure_open()
        if self._blocked:
            raise BrokerUnavailable("the broker is blocking publishers (resource alarm)")

    def publish(self, job_id, body):
        """Publish one job message; returns once it is confirmed."""
        error = self.publish_all([(job_id, body)])[0]
        if error is not None:
            raise error

    def publish_all(self, messages):
        """Publish [(job id, body)] on the channel and wait for all their
        confirms together: [None (confirmed) or BrokerUnavailable], one per
        message."""
        try:
            return self._publish_all(messages)
        except BrokerUnavailable as error:
            # A connection that sat idle may have died with a broker restart:
            # one try on a fresh connection. A fresh one failing is the answer.
            if not error.stale_connection:
                return [error] * len(messages)
        try:
            return self._publish_all(messages)
        except BrokerUnavailable as error:
            return [error] * len(messages)

    def _publish_all(self, messages):
        reused = self._ensure_open()
        if self._blocked:
            raise BrokerUnavailable("the broker is blocking publishers (resource alarm)")
        self._returned, self._nacked = set(), set()
        try:
            for job_id, body in messages:
                properties = pika.BasicProperties(delivery_mode=PERSISTENT, message_id=job_id,
                                                  content_type="application/json")
                self._channel.basic_publish("", self._config.broker.queue, body, properties,
                                            mandatory=True)
                self._published += 1
                self._unconfirmed[self._published] = job_id
            self._wait("confirm the message" if len(messages) == 1
                       else f"confirm {len(messages)} messages")
        except BrokerUnavailable as error:
            # only a connection lost on one made for an earlier request is stale
            raise BrokerUnavailable(str(error),
                                    stale_connection=reused and error.stale_connection) from None
        except (pika.exceptions.AMQPError, OSError) as error:
            self._drop()
            raise BrokerUnavailable(describe(error), stale_connection=reused) from None
        if self._nacked:
            # A fresh channel for the next message: after a quorum queue's
            # leader was killed, RabbitMQ 3.10 went on nacking every message
            # on a channel that had published to the old leader (for minutes,
            # though a new leader took the rest), while new channels worked.
            self._drop()
        return [BrokerUnavailable("the broker refused the message (nack)")
                if job_id in self._nacked else
                BrokerUnavailable(f"no queue {self._config.broker.queue} took the message")
                if job_id in self._returned else None
                for job_id, _body in messages]


class GroupPublisher:
    """One Publisher for all the threads of a process (the API's request
    threads): a thread that finds nobody publishing publishes every message
    waiting at that moment and waits for their confirms together; the others
    wait for it, and the next batch goes out as soon as this one is
    confirmed (a group commit, as storage.GroupSync).

    Each request thread with a connection of its own ran pika's I/O loop
    for its one message, and every poll() gave up the interpreter lock, to
    wait for it again behind the threads busy parsing uploads. Here one
    thread does the I/O for a batch, and the rest wake once, when their
    confirm is in."""

    def __init__(self, publisher):
        self._publisher = publisher
        self._changed = threading.Condition()
        self._waiting = []          # [_Message] not yet published
        self._busy = False          # a thread is using the publisher

    def publish(self, job_id, body):
        message = _Message(job_id, body)
        with self._changed:
            self._waiting.append(message)
            while message.outcome is _Message.PENDING:
                if self._busy:
                    self._changed.wait()
                    continue
                batch, self._waiting = self._waiting, []
                with self._using():
                    try:
                        outcomes = self._publisher.publish_all(
                            [(each.job_id, each.body) for each in batch])
                    except Exception as error:  # noqa: BLE001 - no thread may wait forever
                        logger.exception("Publishing %d messages failed.", len(batch))
                        outcomes = [BrokerUnavailable(f"publisher error ({error!r})")] * len(batch)
                for each, outcome in zip(batch, outcomes):
                    each.outcome = outcome
        if message.outcome is not None:
            # a fresh exception for each thread, not one shared traceback
            raise BrokerUnavailable(str(message.outcome))

    def check(self):
        with self._changed:
            while self._busy:
                self._changed.wait()
            with self._using():
                self._publisher.check()

    def close(self):
        with self._changed:
            while self._busy:
                self._changed.wait()
            self._publisher.close()

    @contextlib.contextmanager
    def _using(self):
        """Hold the publisher, with the condition's lock released meanwhile
        (called with it held)."""
        self._busy = True
        self._changed.release()
        try:
            yield
        finally:
            self._changed.acquire()
            self._busy = False
            self._changed.notify_all()


class _Message:
    PENDING = object()

    def __init__(self, job_id, body):
        self.job_id, self.body = job_id, body
        self.outcome = self.PENDING     # then None, or the BrokerUnavailable


class _TimedOut:
    """What a wait settles with when its time is up."""


#: Cap of the consumers' exponential reconnect backoff (pika's reconnecting
#: example): a lost broker is retried after 1, 2, 4 ... 30 s.
MAX_RECONNECT_BACKOFF = 30.0


def report_lost(error, backoff, notifier):
    """What a consumer (worker, webhook sender) says when its connection
    failed: a journal line and the systemd status."""
    reason = describe(error) if isinstance(error, pika.exceptions.AMQPError) \
        else f"cannot reach the broker ({error})"
    logger.warning("Lost the broker: %s. Reconnecting in %.0f s.", reason, backoff)
    notifier.status(f"Waiting for the broker: {reason}")


def describe(error):
    text = str(error) or type(error).__name__
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return "the broker refused the credentials in [broker] url"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "the broker denied access to the vhost in [broker] url"
    if isinstance(error, pika.exceptions.StreamLostError):
        return f"lost the connection to the broker ({text})"
    if isinstance(error, pika.exceptions.AMQPConnectionError):
        return f"cannot connect to the broker ({type(error).__name__}: {text})"
    return f"broker error ({type(error).__name__}: {text})"
