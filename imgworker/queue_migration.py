"""``imgworker migrate-queues``: move the job queue and the dead-letter queue
to another queue type (classic <-> quorum) without losing a message.

RabbitMQ cannot change a queue's type in place, nor let a service redeclare
it with other arguments. So, with the API and the workers stopped, each
queue whose type differs is emptied into ``<name>.migrating`` (declared with
the new type), deleted, declared anew with the new type, and refilled. Every
message is moved with a publisher confirm before the original is acked, so
a migration cut short leaves each message in the old queue, the new one or
both (a duplicate a worker recognises) -- never in neither -- and running
the command again finishes the job, temp queue included.
"""

import logging

from . import broker

logger = logging.getLogger(__name__)


class MigrationRefused(Exception):
    """Not now: the message says why."""


def _declare(connection, name, arguments, passive=False):
    """The queue's declare-ok frame, or None when RabbitMQ refuses (it does
    not exist, for a passive declare; it has other arguments, otherwise).
    A refusal closes the channel, so each try gets its own."""
    channel = connection.channel()
    try:
        return channel.queue_declare(name, durable=True, arguments=arguments,
                                     passive=passive).method
    except broker.Refused:
        return None
    finally:
        if channel.is_open:
            channel.close()


def _move(connection, source, target):
    """Every message of ``source`` into ``target``; returns how many."""
    channel = connection.channel()
    channel.confirm_delivery()
    moved = 0
    while True:
        method, properties, body = channel.basic_get(source)
        if method is None:
            break
        # Returns only once the broker confirmed it; raises otherwise, and
        # the original stays unacked, so it goes back to ``source``.
        channel.basic_publish("", target, body, properties, mandatory=True)
        channel.basic_ack(method.delivery_tag)
        moved += 1
    channel.close()
    return moved


def _delete_empty(connection, name):
    """Delete the queue, which _move emptied; quorum queues take no
    if-empty flag, so emptiness is checked here (no service runs now)."""
    left = _declare(connection, name, None, passive=True)
    if left is not None and left.message_count:
        raise MigrationRefused(f"{name} still holds {left.message_count} messages "
                               "(is a service publishing?)")
    channel = connection.channel()
    channel.queue_delete(name)
    channel.close()


def migrate(config, queue_type):
    """Make both queues ``queue_type``; returns {queue name: messages moved}."""
    jobs, dead = broker.queue_arguments(config, queue_type)
    connection = broker.connect(config, "migrate-queues")
    moved = {}
    try:
        for name, arguments in ((config.broker.dead_letter_queue, dead),
                                (config.broker.queue, jobs)):
            temp = f"{name}.migrating"
            existing = _declare(connection, name, None, passive=True)
            if existing is not None and existing.consumer_count:
                raise MigrationRefused(f"{name} has {existing.consumer_count} consumers: stop "
                                       "the workers (and the API) first")
            count = 0
            if existing is not None and _declare(connection, name, arguments) is None:
                if _declare(connection, temp, arguments) is None:
                    raise MigrationRefused(f"{temp} exists with other arguments; delete it")
                count = _move(connection, name, temp)
                _delete_empty(connection, name)
                logger.info("Moved %d messages of %s aside to declare it %s.", count, name,
                            queue_type)
            if _declare(connection, name, arguments) is None:
                raise MigrationRefused(f"{name} could not be declared as {queue_type}")
            if _declare(connection, temp, None, passive=True) is not None:
                # This run's move, or one a run cut short left behind.
                count = _move(connection, temp, name)
                _delete_empty(connection, temp)
            moved[name] = count
    finally:
        if connection.is_open:
            connection.close()
    return moved
