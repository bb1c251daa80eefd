"""RabbitMQ: connection parameters, the queue topology, the confirmed publisher.

pika's exceptions stop here: callers see BrokerUnavailable, with a reason.
The worker's consuming loop (worker.py) uses pika directly for its
connection but takes its parameters and topology from this module, so the
API and the workers always declare the same queues with the same arguments
(RabbitMQ refuses a redeclaration that differs).
"""

import json
import logging
import os
import random

import pika
import pika.exceptions

from . import config as configuration

logger = logging.getLogger(__name__)

#: AMQP delivery_mode 2: the broker writes the message to disk (with a
#: durable queue and publisher confirms, a 202 survives a broker restart).
PERSISTENT = 2


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


#: A quorum queue dead-letters a message returned this many times even if
#: no worker's attempt count caught it (a worker killed before it wrote
#: one). Far above max_attempts, so the count on disk decides first; fixed,
#: because RabbitMQ refuses to redeclare a queue with other arguments.
QUORUM_DELIVERY_LIMIT = 20


def queue_arguments(config, queue_type=None):
    """(job queue, dead-letter queue) declare arguments for a queue type
    (default: config's [broker] queue_type)."""
    dead_lettering = {"x-dead-letter-exchange": "",
                      "x-dead-letter-routing-key": config.broker.dead_letter_queue}
    if (queue_type or config.broker.queue_type) == "classic":
        return dead_lettering, {}
    quorum = {"x-queue-type": "quorum"}
    return {**quorum, **dead_lettering,
            # at-least-once dead-lettering needs reject-publish overflow
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
            "x-delivery-limit": QUORUM_DELIVERY_LIMIT}, quorum


def declare_topology(channel, config):
    """The durable job queue, dead-lettering to a durable queue that keeps
    failed jobs for a person to inspect (or shovel back)."""
    jobs, dead = queue_arguments(config)
    channel.queue_declare(config.broker.dead_letter_queue, durable=True, arguments=dead)
    channel.queue_declare(config.broker.queue, durable=True, arguments=jobs)


def job_message(job_id, fmt):
    return json.dumps({"id": job_id, "format": fmt}).encode()


class Publisher:
    """A connection with one confirmed channel, for one thread (pika
    connections are not thread-safe; the API keeps one per request thread).

    ``publish`` returns only once the broker has confirmed the message is
    stored (persistent, durable queue, publisher confirms, mandatory routing),
    and raises BrokerUnavailable otherwise -- within config.broker.timeout
    seconds, give or take one reconnect.
    """

    def __init__(self, config):
        self._config = config
        self._connection = None
        self._channel = None
        self._blocked = False

    def _connect(self):
        try:
            connection = pika.BlockingConnection(parameters(self._config, "api"))
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, self._config)
        except pika.exceptions.AMQPError as error:
            raise BrokerUnavailable(describe(error)) from None
        except OSError as error:
            raise BrokerUnavailable(f"cannot reach the broker ({error})") from None
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._connection, self._channel, self._blocked = connection, channel, False
        logger.info("Connected to the broker; queue %s declared.", self._config.broker.queue)

    def _on_blocked(self, _connection, _frame):
        logger.warning("The broker blocked publishing (a memory or disk alarm); "
                       "uploads get 503 until it clears.")
        self._blocked = True

    def _on_unblocked(self, _connection, _frame):
        logger.info("The broker unblocked publishing.")
        self._blocked = False

    def close(self):
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass

    def _ensure_open(self):
        """Connect if needed and take in pending frames (blocked notices,
        heartbeats). Returns True if an existing connection was reused."""
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(0)
                return True
            except (pika.exceptions.AMQPError, OSError):
                self.close()
        self._connect()
        return False

    def check(self):
        """Raise BrokerUnavailable unless the broker is reachable now."""
        self._ensure_open()
        if self._blocked:
            raise BrokerUnavailable("the broker is blocking publishers (resource alarm)")

    def publish(self, job_id, body):
        properties = pika.BasicProperties(delivery_mode=PERSISTENT, message_id=job_id,
                                          content_type="application/json")
        try:
            self._publish(body, properties)
        except BrokerUnavailable as error:
            # A connection that sat idle may have died with a broker restart:
            # one try on a fresh connection. A fresh one failing is the answer.
            if not error.stale_connection:
                raise
            self._publish(body, properties)

    def _publish(self, body, properties):
        reused = self._ensure_open()
        if self._blocked:
            raise BrokerUnavailable("the broker is blocking publishers (resource alarm)")
        try:
            self._channel.basic_publish("", self._config.broker.queue, body,
                                        properties, mandatory=True)
        except pika.exceptions.UnroutableError:
            raise BrokerUnavailable(f"no queue {self._config.broker.queue} "
                                    "took the message") from None
        except pika.exceptions.NackError:
            raise BrokerUnavailable("the broker refused the message (nack)") from None
        except pika.exceptions.ConnectionBlockedTimeout:
            self.close()
            raise BrokerUnavailable("the broker is blocking publishers (resource alarm)") \
                from None
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(describe(error), stale_connection=reused) from None


def describe(error):
    text = str(error) or type(error).__name__
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return "the broker refused the credentials in [broker] url"
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return "the broker denied access to the vhost in [broker] url"
    if isinstance(error, pika.exceptions.AMQPConnectionError):
        return f"cannot connect to the broker ({type(error).__name__}: {text})"
    return f"broker error ({type(error).__name__}: {text})"
