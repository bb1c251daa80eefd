"""``imgworker dlq``: the dead-letter queue, where jobs that failed for good
wait for a person.

- list: what is there -- job id, why it failed, attempts, since when --
  left in place;
- replay: the job queued again. Its record is reset first (attempts start
  over; the old error is kept as the last one), then its message republished
  with a publisher confirm, and only after that confirm is the dead letter
  removed. A replay cut short at any point leaves the dead letter, so
  running it again finishes the job; one queued twice is done once (a worker
  acknowledges a finished job);
- purge: dead letters removed, all or those older than a duration. The
  jobs' records stay, ``failed``: GET /jobs/<id> still says why.

Anyone with publish rights can put anything in the queue, so a dead letter
is described without trusting it: a body that is not a job message, or an
``x-death`` header that is not what RabbitMQ writes, is shown with its raw
fields escaped (no control character reaches the terminal), never raised
on. A dead letter whose time cannot be read has no age: ``purge
--older-than`` keeps it, plain ``purge`` removes it. ``replay`` refuses a
dead letter that is not a job, saying why, and goes on with the others.

While the queue is read, its messages are held unacknowledged on one
channel; whatever is not removed goes back to the queue when the connection
closes.
"""

import datetime
import logging
from dataclasses import dataclass

from . import broker
from .config import parse_duration  # noqa: F401 - the dlq's --older-than
from .job import State
from .storage import Erased, Storage

logger = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    job_id: str            # None: not an imgworker job message
    reason: str            # the record's error, or RabbitMQ's x-death reason
    attempts: int          # None without a record
    since: datetime.datetime   # when it was dead-lettered (aware, UTC), if RabbitMQ said
    tag: int

    def as_dict(self):
        return {"id": self.job_id, "reason": self.reason, "attempts": self.attempts,
                "since": self.since.strftime("%Y-%m-%dT%H:%M:%SZ") if self.since else None}


class DeadLetterQueue:
    """A connection holding every dead letter unacknowledged (a context
    manager: leaving it returns what was not removed)."""

    def __init__(self, config):
        self.config = config
        self.storage = Storage(config.storage.root)
        self._connection = None
        self._channel = None

    def __enter__(self):
        self._connection = broker.connect(self.config, "dlq")
        try:
            self._channel = self._connection.channel()
            try:
                broker.declare_topology(self._channel, self.config)
            except broker.Refused as error:     # declared with other arguments
                raise broker.BrokerUnavailable(broker.describe(error)) from None
        except broker.BrokerUnavailable:
            self._connection.close()
            raise
        return self

    def __exit__(self, *_exc):
        if self._connection is not None:
            try:
                self._connection.close()
            except broker.BrokerUnavailable:
                pass        # lost: the broker returns what we held all the same

    def take_all(self):
        """Every dead letter, oldest first, held until the connection closes."""
        letters = []
        while True:
            method, properties, body = self._channel.basic_get(self.config.broker.dead_letter_queue)
            if method is None:
                return letters
            letters.append(self._describe(method.delivery_tag, properties, body))

    def _describe(self, tag, properties, body):
        job_id = broker.job_id_of(body)
        reason, since = _death(properties.headers)
        if job_id is None:
            return DeadLetter(None, f"not an imgworker job: {body[:60]!r}; {reason}", None,
                              since, tag)
        job = self.storage.read_job(job_id)
        if job is not None and job.error:
            reason = _shown(job.error)
        return DeadLetter(job_id, reason, job.attempts if job else None, since, tag)

    def remove(self, letter):
        self._channel.basic_ack(letter.tag)


def _death(headers):
    """(reason, since) from the newest ``x-death`` entry RabbitMQ wrote;
    what is not as RabbitMQ writes it is shown escaped, its time None."""
    deaths = headers.get("x-death") if isinstance(headers, dict) else None
    if deaths is None:
        return "dead-lettered by RabbitMQ (unknown reason)", None
    death = deaths[0] if isinstance(deaths, list) and deaths else None
    if not isinstance(death, dict):
        return f"unreadable x-death header: {_shown(deaths, always=True)}", None
    reason = f"dead-lettered by RabbitMQ ({_shown(death.get('reason', 'unknown reason'))})"
    since = death.get("time")
    if not isinstance(since, datetime.datetime):
        if since is not None:
            reason += f"; unreadable x-death time: {_shown(since, always=True)}"
        return reason, None
    if since.tzinfo is None:
        # pika before 1.3 decodes AMQP timestamps as naive UTC, later as aware
        since = since.replace(tzinfo=datetime.timezone.utc)
    return reason, since


#: Enough of a raw field to recognise it, not a screenful.
_SHOWN_CHARS = 200


def _shown(value, always=False):
    """A field safe to print: text of printable characters as it is (unless
    ``always``), anything else escaped by repr; cut to _SHOWN_CHARS."""
    if always or not (isinstance(value, str) and value.isprintable()):
        value = repr(value)
    return value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."


def list_dead(config):
    with DeadLetterQueue(config) as queue:
        return queue.take_all()


def replay(config, job_ids=None):
    """Queue again the dead-lettered jobs with these ids (None: all);
    returns (replayed ids, ids not found in the dead-letter queue)."""
    wanted = None if job_ids is None else set(job_ids)
    replayed = []
    publisher = broker.Publisher(config)
    try:
        with DeadLetterQueue(config) as queue:
            for letter in queue.take_all():
                if letter.job_id is None:
                    if wanted is None:
                        logger.warning("A dead letter is not a job, so it is not replayed (left "
                                       "in the dead-letter queue): %s.", letter.reason)
                    continue
                if wanted is not None and letter.job_id not in wanted:
                    continue
                if _replay_one(queue, publisher, letter):
                    replayed.append(letter.job_id)
    finally:
        publisher.close()
    found = set(replayed)
    return replayed, sorted((wanted or set()) - found)


def _replay_one(queue, publisher, letter):
    if queue.storage.is_erased(letter.job_id):
        logger.info("Job %s was erased; removing its dead letter.", letter.job_id)
        queue.remove(letter)
        return False
    job = queue.storage.read_job(letter.job_id)
    if job is None:
        logger.warning("Job %s has no record below %s: it cannot be replayed (left in the "
                       "dead-letter queue).", letter.job_id, queue.storage.root)
        return False
    if job.state is State.DONE:
        logger.info("Job %s is done after all; removing its dead letter.", job.id)
        queue.remove(letter)
        return False
    if job.state is State.FAILED:
        job.replay()
        try:
            queue.storage.write_job(job)
        except Erased:                  # erased since it was read
            logger.info("Job %s was erased; removing its dead letter.", job.id)
            queue.remove(letter)
            return False
    # (a record already queued: an earlier replay stopped before removing
    # the dead letter; the message goes out again)
    publisher.publish(job.id, broker.job_message(job.id, job.original["format"]))
    queue.remove(letter)
    logger.info("Job %s queued again (it had failed: %s).", job.id, job.last_error)
    return True


def purge(config, older_than=None):
    """Remove dead letters (those dead-lettered more than ``older_than``
    seconds ago, or all); returns how many."""
    now = datetime.datetime.now(datetime.timezone.utc)
    removed = 0
    with DeadLetterQueue(config) as queue:
        for letter in queue.take_all():
            if older_than is not None and (
                    letter.since is None
                    or (now - letter.since).total_seconds() <= older_than):
                continue
            queue.remove(letter)
            removed += 1
    return removed
