"""The job policy: given one delivery, what happens to its job -- which
record and files are written, and how the delivery is to be settled. It
knows nothing of AMQP, threads or systemd (worker.py, the consumer, does
that), so each outcome can be tested on its own: tests/test_policy.py.

- a message that is not a job, or a bug met on the way: dead-lettered;
- an unknown job (its upload was refused after all): acknowledged;
- a finished job redelivered (its ack was lost): settled as it ended;
- each delivery counts an attempt in the record *before* work starts, so a
  job that kills its worker every time is failed after ``max_attempts``;
- undecodable or over-limit images and renders over ``job_timeout`` fail at
  once; anything else (I/O errors, a renderer that died) is retried after
  ``retry_delay``, until ``max_attempts``;
- a full disk, or shared storage gone from sight (unmounted), is the
  host's problem, not the job's: the policy waits with the job in hand and
  its attempts untouched.

A job is handled in two steps, so that a worker can render one job while
the last one's files are made durable: ``begin`` reads the delivery,
counts the attempt and renders (the renderer leaves the renditions under
temp names); ``finish`` makes the renditions and the record durable and
says how to settle. ``handle`` does both, one after the other.
"""

import copy
import enum
import logging
import os
import threading
import time
import typing

from . import broker, images, ingest, waits
from .job import Job, State
from .log import JobLog
from .renderer import RenderTimeout
from .storage import Erased, StorageFull

logger = logging.getLogger(__name__)

class Decision(enum.Enum):
    """How the consumer settles the delivery."""
    ACK = "ack"                  # done (or nothing left to do)
    DEAD_LETTER = "dead-letter"  # failed for good: reject without requeue
    REQUEUE = "requeue"          # transient failure, or stopping: hand it back


class Outcome(typing.NamedTuple):
    """What became of one delivery."""
    decision: Decision
    #: The job if it ended (done or failed), also when it had ended before
    #: (a redelivery): its event is published before the ack, so a worker
    #: dying in between sends it twice, never zero times.
    ended: typing.Optional[Job] = None
    #: "done", "failed" or "retried" when this delivery did that to the job
    #: (the jobs counted in metrics), else None.
    counted: typing.Optional[str] = None


class Rendered(typing.NamedTuple):
    """A job ``begin`` rendered, its renditions staged but not yet durable."""
    job: Job            # started: its attempts count this one
    before: Job         # the record as it was before this attempt
    log: JobLog
    staged: object      # renderer.Staged
    started: float     # monotonic time its render began
    seconds: float     # the render's, the job's own time (its record says it)


class JobPolicy:
    """One worker's handling of jobs: at most one in ``begin`` and one in
    ``finish`` at a time, in two threads of the worker.

    ``render(job_id, progress)`` renders the job and stages its renditions:
    a renderer.Staged (the renderer child);
    ``progress()`` is called at every step of a job and during waits;
    ``status(text)`` says what is going on (sd_notify STATUS=);
    ``stopping()`` is true once the worker was asked to stop.
    """

    def __init__(self, config, instance, storage, render, progress=lambda: None,
                 status=lambda text: None, stopping=lambda: False):
        self.config = config
        self.instance = instance
        self.storage = storage
        self._render = render
        self._progress = progress
        self._status = status
        self._stopping = stopping
        self._lock = threading.Lock()
        self._steps = {}            # id of each job in hand -> monotonic time of its last step
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_retried = 0

    def idle_status(self):
        return f"Waiting for jobs; {self.jobs_done} done, {self.jobs_failed} failed."

    def silence(self):
        """Seconds since the job in hand that moved least recently made a
        step (the watchdog's measure of a stall); None with no job in hand."""
        with self._lock:
            oldest = min(self._steps.values(), default=None)
        return None if oldest is None else time.monotonic() - oldest

    def handle(self, body, redelivered=False):
        """``begin``, then ``finish`` if it rendered: the whole delivery."""
        begun = self.begin(body, redelivered)
        return self.finish(begun) if isinstance(begun, Rendered) else begun

    def begin(self, body, redelivered=False):
        """Read the delivery, count the attempt and render: a Rendered job
        for ``finish``, or the Outcome if the job ends (or is handed back)
        here. Never raises: an exception would leave the delivery
        unsettled, and the worker would hold it forever while feeding the
        watchdog."""
        job_id = broker.job_id_of(body)
        if job_id is None:
            logger.error("Dead-lettering a message that is not an imgworker job "
                         "(not a JSON object with a 32-hex-digit id): %r", body[:200])
            return Outcome(Decision.DEAD_LETTER)
        log = JobLog(logger, job_id)
        try:
            return self._begin(log, redelivered)
        except Erased:
            return self._erased(log)
        except Exception:  # noqa: BLE001 - a bug must not stall the worker
            log.exception("dead-lettered after an unexpected error.")
            return Outcome(Decision.DEAD_LETTER)
        finally:
            self._put_down(job_id)

    def finish(self, rendered):
        """Make a rendered job's renditions and record durable: the
        Outcome, ACK only once they are. Never raises (as ``begin``)."""
        job, log = rendered.job, rendered.log
        self._step(job.id)
        try:
            return self._finish(rendered)
        except Erased:
            return self._erased(log)
        except Exception:  # noqa: BLE001 - a bug must not stall the worker
            log.exception("dead-lettered after an unexpected error.")
            return Outcome(Decision.DEAD_LETTER)
        finally:
            self._put_down(job.id)

    # -- the two steps ----------------------------------------------------------
    def _begin(self, log, redelivered):
        job_id = log.job_id
        if not self._when_storage_in_sight(log):
            return Outcome(Decision.REQUEUE)
        if self.storage.is_erased(job_id):
            return self._erased(log)
        job = self.storage.read_job(job_id)
        if job is None:
            # The API removes state and original when the broker did not
            # confirm (the client got 503), so there is nothing to do.
            log.warning("dropped: no such job in %s (its upload was refused).",
                        self.storage.root)
            return Outcome(Decision.ACK)
        ingest.delivered(self.storage, job_id)
        if job.state.finished:
            # Finished before, but the ack was lost (crash, broker restart).
            log.info("already %s; acknowledging the redelivery.", job.state.value)
            return Outcome(Decision.ACK if job.state is State.DONE else Decision.DEAD_LETTER, job)

        attempts = job.attempts + 1
        max_attempts = self.config.worker.max_attempts
        if attempts > max_attempts:
            reason = (f"gave up after {max_attempts} attempts; the last one ended "
                      f"without a result (did the worker crash?)"
                      + (f"; earlier: {job.last_error}" if job.last_error else ""))
            return self._fail(job, log, reason)

        self._step(job_id)
        self._status(f"Processing job {job_id} (attempt {attempts}).")
        before = copy.copy(job)
        try:
            job.start(self.instance)
            if not self._when_space(log, lambda: self.storage.write_job(job)):
                return Outcome(Decision.REQUEUE)
            log.info("processing (attempt %d of %d%s).", attempts, max_attempts,
                     ", redelivered" if redelivered else "")
            original = self.storage.original_path(job_id)
            os.stat(original)   # a missing original fails the job (below), not the renderer
            rendered = []

            def render():
                started = time.monotonic()
                staged = self._render(job_id, lambda: self._step(job_id))
                rendered.append(Rendered(job, before, log, staged, started,
                                         round(time.monotonic() - started, 3)))
            # The renderer's staging of the renditions may find the disk full.
            if not self._when_space(log, render):
                return Outcome(Decision.REQUEUE)
            return rendered[0]
        except Erased:
            raise
        except (images.BadImage, images.UnsupportedFormat) as error:
            return self._fail(job, log, f"the image cannot be processed: {error}")
        except RenderTimeout as error:
            return self._fail(job, log, str(error))
        except FileNotFoundError as error:
            if error.filename == self.storage.original_path(job_id):
                return self._fail(job, log, "the uploaded original is missing from storage")
            return self._retry(job, log, attempts, error)
        except Exception as error:  # noqa: BLE001 - bounded by max_attempts
            if self.storage.is_erased(job_id):
                raise Erased(job_id) from None      # the original went with it
            return self._retry(job, log, attempts, error)

    def _finish(self, rendered):
        job, log, staged = rendered.job, rendered.log, rendered.staged
        renditions = {
            output.rendition.name: {
                "url": self.storage.rendition_url(job.id, output.rendition),
                "width": output.width, "height": output.height,
                "format": output.rendition.format, "bytes": output.size,
            } for output in staged.outputs}
        # The record says done only once it is written: a write that fails
        # leaves ``job`` as it was, to be handed back (or failed) from there.
        done = copy.copy(job)
        done.finish(renditions, rendered.seconds)
        try:
            self.storage.commit_renditions(job.id, staged.files)
        except Erased:
            raise
        except StorageFull as error:
            return self._render_again(rendered, error)
        except Exception as error:  # noqa: BLE001 - bounded by max_attempts
            return self._retry(job, log, job.attempts, error)
        try:
            if not self._when_space(log, lambda: self.storage.write_job(done)):
                return Outcome(Decision.REQUEUE)
        except Erased:
            raise
        except Exception as error:  # noqa: BLE001 - bounded by max_attempts
            return self._retry(job, log, job.attempts, error)
        self._count("done")
        log.info("done in %.0f ms: %s.", 1000 * (time.monotonic() - rendered.started),
                 ", ".join(f"{name} {r['width']}x{r['height']}"
                           for name, r in renditions.items()))
        return Outcome(Decision.ACK, done, "done")

    # -- bookkeeping ------------------------------------------------------------
    def _step(self, job_id):
        with self._lock:
            self._steps[job_id] = time.monotonic()
        self._progress()

    def _put_down(self, job_id):
        with self._lock:
            self._steps.pop(job_id, None)
            in_hand = list(self._steps)
        self._status(f"Processing job {in_hand[-1]}." if in_hand else self.idle_status())

    def _count(self, what):
        with self._lock:
            setattr(self, f"jobs_{what}", getattr(self, f"jobs_{what}") + 1)

    # -- waits and endings ------------------------------------------------------
    def _when_space(self, log, write):
        """Run ``write``; while storage is full, wait for space instead of
        spending the job's attempts on it (a full disk is the host's problem,
        not the job's). False if the worker is asked to stop meanwhile."""
        waiting = False
        while True:
            try:
                write()
                if waiting:
                    log.info("storage has space again; carrying on.")
                return True
            except StorageFull as error:
                if not waiting:
                    log.error("waiting: %s. Free space below %s; the job resumes by itself.",
                              error, self.storage.root)
                    self._status(f"Waiting for space below {self.storage.root}.")
                    waiting = True
            if not self._pause(log.job_id, self.config.worker.retry_delay):
                return False

    def _when_storage_in_sight(self, log):
        """The root lost the API's marker since the worker started: the
        shared storage was unmounted. The job's record is out of sight, not
        gone, so it must not be taken for a refused upload: wait with the
        job in hand. False if the worker is asked to stop meanwhile."""
        def waiting():
            log.error("waiting: %s is not the API's storage any more (was the shared storage "
                      "unmounted?); the job resumes once it is back.", self.storage.root)
            self._status(f"Waiting for the storage: {self.storage.root} is not the API's.")
        return waits.until(self.storage.is_shared_root,
                           lambda: self._pause(log.job_id, self.config.worker.retry_delay),
                           waiting, lambda: log.info("the storage is back; carrying on."))

    def _render_again(self, rendered, error):
        """The disk filled up between staging the renditions and making them
        durable, and their staged files are gone (storage.commit). The job is
        handed back to be rendered again, once there is space, with its
        record as it was before this attempt: the host's problem must not
        spend the job's attempts."""
        log = rendered.log
        log.error("waiting: %s. Free space below %s; the job is rendered again once there "
                  "is space.", error, self.storage.root)
        self._when_space(log, lambda: self.storage.write_job(rendered.before))
        return Outcome(Decision.REQUEUE)

    def _erased(self, log):
        """The job was erased (before this delivery, or while in hand):
        nothing of it is written, no event sent, the delivery acknowledged."""
        log.info("erased; the delivery is dropped and nothing of the job written.")
        return Outcome(Decision.ACK)

    def _fail(self, job, log, reason):
        log.error("failed: %s", reason)
        self._count("failed")
        job.fail(reason)
        try:
            self.storage.write_job(job)
        except Erased:
            raise
        except (OSError, StorageFull) as error:
            log.error("could not record the failure (%s); it is dead-lettered all the same.",
                      error)
        return Outcome(Decision.DEAD_LETTER, job, "failed")

    def _retry(self, job, log, attempts, error):
        reason = str(error) or type(error).__name__
        if attempts >= self.config.worker.max_attempts:
            return self._fail(job, log, f"gave up after {attempts} attempts: {reason}")
        log.warning("attempt %d failed (%s); handing it back in %g s.",
                    attempts, reason, self.config.worker.retry_delay, exc_info=True)
        job.requeue(reason)
        self._count("retried")
        try:
            self.storage.write_job(job)
        except (OSError, StorageFull):
            pass
        self._pause(job.id, self.config.worker.retry_delay)
        return Outcome(Decision.REQUEUE, None, "retried")

    def _pause(self, job_id, seconds):
        """Sleep, showing progress; False if the worker is asked to stop."""
        return waits.pause(seconds, self._stopping, lambda: self._step(job_id))
