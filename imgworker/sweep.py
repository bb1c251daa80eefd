"""Closing the gap a crashed API leaves: `imgworker sweep`.

Between storing an upload and the broker's confirm, the API process can die
(kill -9, OOM, power). The client then got no 202, or got one just before the
crash; either way the job must not linger. The sweep, run by
imgworker-sweep.timer, looks for what such a crash leaves behind once it is
older than [api] requeue_after:

- a job still marked pending: queued again if it is still `queued` (a
  duplicate message is harmless, workers acknowledge a finished job), else
  only unmarked, since a worker already had its message;
- an original with no job state at all: the upload was never accepted, so it
  is deleted;
- temp files of a write that never finished.
"""

import logging

from . import broker
from .job import State
from .log import JobLog
from .storage import Storage

logger = logging.getLogger(__name__)


def sweep(config, older_than=None):
    """One pass; returns (requeued, unmarked, dropped) counts. Raises
    broker.BrokerUnavailable when there is something to queue and no broker."""
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
            job = storage.read_job(job_id)
            if job is None:
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
