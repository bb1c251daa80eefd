"""Upload durability: how an upload becomes an accepted job, and how what a
crash leaves on the way is recovered. The promise: a 202 only once the
original is fsynced and the broker confirmed a persistent message; and no
upload lingers, whatever instant the API dies at.

    accept():
      original + record `queued` + pending mark durable ──► published + confirmed ──► mark cleared ──► 202
           │                                                         │
           └─ storage full / broker refuses: removed (unless a worker already
              took the job), 507 / 503 ──────────────────────────────────────┘
    the API dies (kill -9, OOM, power) at any arrow: recover(), run by
    imgworker-sweep.timer, finds what is older than [api] requeue_after:
      - a pending mark with a `queued` record: published again (a duplicate
        message is harmless: a worker acknowledges a finished job), unless
        its original is not all on disk (one sync makes both durable, in no
        set order, so power lost during it can leave the record alone):
        removed, it had no 202;
      - a pending mark with a record a worker moved on: only unmarked (the
        worker's delivered() normally clears it first);
      - a pending mark, or an original, with no record: never accepted, so
        nobody was promised anything: removed;
      - temp files of writes that never finished.

Storage.store_upload() says how the three are made durable together. A
mark lost after the confirm only makes recover() queue a job twice.
"""

import logging

from . import broker
from .job import Job, State
from .log import JobLog
from .storage import Storage, new_job_id

logger = logging.getLogger(__name__)


def accept(storage, publisher, data, info, owner=None):
    """Store the upload and queue its job; returns the job id once both are
    durable. Raises StorageFull or broker.BrokerUnavailable, having removed
    whatever it stored -- unless a worker took the job meanwhile; then the
    exception's ``job_kept`` is true."""
    job_id = new_job_id()
    log = JobLog(logger, job_id)
    try:
        # The record before the message: a worker may take the job before
        # publish returns.
        storage.store_upload(Job.accepted(job_id, info.format, info.width, info.height,
                                          len(data), owner), data)
        publisher.publish(job_id, broker.job_message(job_id, info.format))
    except BaseException as error:
        # A broker killed between routing the message and confirming it may
        # already have handed the job to a worker: once a worker moved the
        # record on, the job is being done (the client saw no 202, and the
        # sweep need not act), so nothing of it is removed.
        job = storage.read_job(job_id)
        kept = job is not None and job.state is not State.QUEUED
        if not kept:
            storage.forget_job(job_id)
        log.warning("refused: %s%s", error, "; a worker has the job, which is kept" if kept else "")
        try:
            error.job_kept = kept
        except AttributeError:
            pass
        raise
    storage.clear_pending(job_id)
    log.info("accepted: %s %dx%d, %d bytes.", info.format, info.width, info.height, len(data))
    return job_id


def delivered(storage, job_id):
    """A worker has the job's message: recover() need not queue it again."""
    storage.clear_pending(job_id)


def recover(config, older_than=None):
    """One pass of `imgworker sweep`; returns (requeued, unmarked, dropped).
    Raises broker.BrokerUnavailable when there is something to queue and no
    broker."""
    age = config.api.requeue_after if older_than is None else older_than
    storage = Storage(config.storage.root)
    requeued = unmarked = dropped = 0
    if storage.remove_stale_temp_files(age):
        logger.info("Removed temp files of writes that never finished.")
    for job_id in storage.orphan_originals(age):
        JobLog(logger, job_id).warning("dropping an upload that was never accepted "
                                       "(the API stopped before storing its state).")
        storage.forget_job(job_id)
        dropped += 1
    publisher = None
    try:
        for job_id in storage.pending_jobs(age):
            log = JobLog(logger, job_id)
            if storage.is_erased(job_id):   # its erasure (or the sweep's) removes it
                storage.clear_pending(job_id)
                continue
            job = storage.read_job(job_id)
            if job is None:
                storage.forget_job(job_id)
                dropped += 1
                continue
            if job.state is State.QUEUED and not storage.has_original(job):
                # The host stopped while the upload's sync was under way:
                # the record reached the disk, not all of the original. It
                # had no 202 (that comes after the sync), so nobody was
                # promised anything.
                log.warning("dropping an upload whose original is incomplete on disk (the "
                            "host stopped before it was synced); it was never accepted.")
                storage.forget_job(job_id)
                dropped += 1
                continue
            if job.state is State.QUEUED:
                publisher = publisher or broker.Publisher(config)
                publisher.publish(job_id, broker.job_message(job_id, job.original["format"]))
                log.warning("queued again: its upload was stored but the API stopped "
                            "before the broker confirmed it.")
                requeued += 1
            else:
                unmarked += 1
            storage.clear_pending(job_id)
    finally:
        if publisher is not None:
            publisher.close()
    return requeued, unmarked, dropped
