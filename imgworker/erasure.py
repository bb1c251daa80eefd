"""Erasure: a job, or every job of one owner, gone from the storage for good,
and the app told so (``job.deleted``), whatever the job was doing.

    1. tombstone   ROOT/tombstones/<id> and ROOT/erasing/<id>, written under
                   the job's lock, then synced: from here on no process
                   writes a file of the job (Storage.unless_erased), and a
                   delivery of it is dropped
    2. remove      renditions, original, record, pending mark, owner entry;
                   synced
    3. announce    job.deleted on imgworker.events, confirmed; the tombstone
                   says so, and the erasing mark goes

An erasure cut short at any step (the API killed, the host down) is
finished by the next ``imgworker sweep``, from the erasing marks: a caller is
answered only after step 3. All of an owner's jobs are tombstoned before
any is removed, so a cut-short erasure by owner leaves no job of that owner
untouched and unmarked.

Tombstones stay: a message of the job may still sit in a queue, or in the
dead-letter queue for a person to replay, and must find one. Each is a few
hundred bytes.
"""

import enum
import json
import logging
import time

import pika

from . import broker, metrics
from .log import JobLog
from .storage import Storage, is_job_id

logger = logging.getLogger(__name__)

#: Seconds an erasure waits for a job's lock, held by a worker committing
#: its files or sending its event (milliseconds, normally): past it the
#: caller is told to try again.
LOCK_TIMEOUT = 10


class Result(str, enum.Enum):
    ERASED = "erased"       # erased now
    GONE = "gone"           # erased before
    UNKNOWN = "unknown"     # no such job


def deleted_event(tombstone):
    """(routing key, body, properties) of the event that says a job was
    erased: its id, owner and why (request or retention)."""
    body = {key: tombstone.get(key) for key in ("id", "owner", "reason")}
    return (broker.JOB_DELETED, json.dumps(body).encode(),
            pika.BasicProperties(delivery_mode=broker.PERSISTENT, message_id=tombstone["id"],
                                 content_type="application/json"))


class Eraser:
    """Erases jobs of one storage; announces each on the broker, over one
    connection opened when first needed (close() it)."""

    def __init__(self, config, storage=None):
        self.config = config
        self.storage = storage or Storage(config.storage.root)
        self._connection = self._channel = None

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    # -- what callers ask -----------------------------------------------------------
    def erase(self, job_ids, reason="request"):
        """{job id: Result}. Raises storage.LockTimeout or
        broker.BrokerUnavailable with the erasures that were begun left for
        the sweep (or a retry) to finish."""
        results, begun = {}, []
        for job_id in job_ids:
            if not is_job_id(job_id):
                results[job_id] = Result.UNKNOWN
                continue
            tombstone = self.storage.read_tombstone(job_id)
            if tombstone is not None:
                results[job_id] = Result.GONE
                if not tombstone.get("announced"):
                    begun.append(tombstone)     # one cut short: finish it
                continue
            try:
                tombstone = self.storage.lay_tombstone(job_id, reason, LOCK_TIMEOUT)
            except LookupError:
                results[job_id] = Result.UNKNOWN
                continue
            if tombstone is None:               # another erasure was first
                results[job_id] = Result.GONE
            else:
                results[job_id] = Result.ERASED
                begun.append(tombstone)
        self.storage.sync()
        self._finish(begun)
        return results

    def erase_owner(self, owner, reason="request"):
        """How many of the owner's jobs were erased now. Written down
        before the first tombstone, so one cut short is run again whole by
        the sweep."""
        self.storage.begin_owner_erasure(owner)
        results = self.erase(self.storage.owner_jobs(owner), reason)
        self.storage.end_owner_erasure(owner)
        return sum(result is Result.ERASED for result in results.values())

    def finish_unfinished(self, older_than):
        """The sweep's part: finish the erasures cut short more than
        ``older_than`` seconds ago. Returns how many."""
        tombstones = []
        for job_id in self.storage.unfinished_erasures(older_than):
            tombstone = self.storage.read_tombstone(job_id)
            if tombstone is None:           # cut short before its tombstone was written
                self.storage.finish_erasing(job_id)
            else:
                tombstones.append(tombstone)
        self._finish(tombstones)
        finished = len(tombstones)
        for owner in self.storage.unfinished_owner_erasures(older_than):
            finished += self.erase_owner(owner)
        return finished

    # -- steps 2 and 3 ----------------------------------------------------------------
    def _finish(self, tombstones):
        if not tombstones:
            return
        for tombstone in tombstones:
            self.storage.remove_job_files(tombstone["id"], tombstone.get("owner"),
                                          tombstone.get("ended"))
        self.storage.sync()
        for tombstone in tombstones:
            if not tombstone.get("announced"):
                self._announce(tombstone)
                # The owner was kept for the event alone: once it is out,
                # the tombstone says nothing of whose the job was.
                self.storage.update_tombstone({**tombstone, "announced": True, "owner": None})
                metrics.count_erased(tombstone.get("reason", "request"))
        # The blanked tombstones durable before the marks go that would have
        # the sweep finish them again (a crash before it: the sweep sends
        # job.deleted once more, which at-least-once allows).
        self.storage.sync()
        for tombstone in tombstones:
            self.storage.finish_erasing(tombstone["id"])
            JobLog(logger, tombstone["id"]).info(
                "erased (%s): its original, record and renditions are gone.",
                tombstone.get("reason"))

    def _announce(self, tombstone):
        if self._channel is None:
            self._connection = broker.connect(self.config, "erasure")
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            self._channel.exchange_declare(broker.EVENTS_EXCHANGE, "topic", durable=True)
        routing_key, body, properties = deleted_event(tombstone)
        try:
            self._channel.basic_publish(broker.EVENTS_EXCHANGE, routing_key, body, properties)
        except broker.BrokerUnavailable:
            self.close()
            raise
