"""The consumer: takes jobs off the queue and writes their renditions.

Threads, as in pika's ``basic_consumer_threaded`` example:
- the main thread owns the connection; it runs pika's I/O (heartbeats
  included), signals, systemd notifications and the watchdog;
- one render thread does the image work, so a long job never starves the
  heartbeat; it hands acks back with ``add_callback_threadsafe``.

Delivery guarantees:
- a job is acked only after every rendition and the ``done`` state are
  fsynced; a crash before that means the broker redelivers it, and the
  deterministic paths make the second run overwrite the first;
- each delivery counts an attempt in the job's state file *before* work
  starts, so a job that kills its worker every time (a poison message) is
  dead-lettered after ``max_attempts`` instead of crash-looping the unit;
- undecodable or over-limit images, and jobs over ``job_timeout``, fail at
  once (no retry) with a reason; anything else (disk full, I/O errors, a
  renderer that crashed) is retried after ``retry_delay``.

The image work itself runs in a child process (renderer.py), so a decoder
that hangs or crashes costs one job attempt, never the worker.
"""

import functools
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pika
import pika.exceptions

from . import broker, images, ingest
from .job import State
from .log import JobLog
from .renderer import Renderer, RenderTimeout
from .storage import Storage, StorageFull, is_job_id

logger = logging.getLogger(__name__)

#: Cap of the exponential reconnect backoff (pika's reconnecting example).
MAX_BACKOFF = 30.0

#: How long pika may sit in I/O before the main loop looks at signals and
#: the watchdog again.
_TICK = 0.5


class _Ack:
    """What the render thread decided for one delivery."""
    ACK = "ack"                  # done (or nothing left to do)
    DEAD_LETTER = "dead-letter"  # failed for good: reject without requeue
    REQUEUE = "requeue"          # transient failure: hand it back


class Worker:
    def __init__(self, config, instance, notifier):
        self.config = config
        self.instance = instance
        self.notifier = notifier
        self.storage = Storage(config.storage.root)
        self.limits = images.Limits.from_config(config)
        self._render_thread = ThreadPoolExecutor(1, thread_name_prefix="render")
        self.renderer = Renderer(config.renditions, self.limits, config.worker.job_timeout)
        self._in_hand = {}          # delivery tag -> Future, on the current channel
        self._current_job = None    # id of the job being rendered
        self._progress_at = None    # monotonic time of its last step
        self._stop_requested = False
        self._ready_sent = False
        self._last_ping = 0.0
        self.jobs_done = 0
        self.jobs_failed = 0

    # -- lifecycle --------------------------------------------------------
    def _on_signal(self, signum, _frame):
        if self._stop_requested:
            # A second SIGTERM/SIGINT: the operator wants out now. The job in
            # hand is unacked, so the broker gives it to another worker.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._stop_requested = True

    def run(self):
        """Consume until SIGTERM; returns the process exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        backoff = 1.0
        while not self._stop_requested:
            try:
                self._consume()
                backoff = 1.0
            except (pika.exceptions.AMQPError, OSError) as error:
                if self._stop_requested:
                    break
                reason = broker.describe(error) if isinstance(error, pika.exceptions.AMQPError) \
                    else f"cannot reach the broker ({error})"
                logger.warning("Lost the broker: %s. Reconnecting in %.0f s.", reason, backoff)
                self.notifier.status(f"Waiting for the broker: {reason}")
                self._finish_in_hand(connection=None)
                self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self.notifier.stopping(f"Stopped after {self.jobs_done} jobs done, "
                               f"{self.jobs_failed} failed.")
        logger.info("Stopped: %d jobs done, %d failed.", self.jobs_done, self.jobs_failed)
        self._render_thread.shutdown(wait=True)
        self.renderer.stop()
        return 0

    def _sleep(self, seconds):
        deadline = time.monotonic() + seconds
        while not self._stop_requested and time.monotonic() < deadline:
            self._tick()
            time.sleep(min(_TICK, max(0.0, deadline - time.monotonic())))

    def _consume(self):
        connection = pika.BlockingConnection(broker.parameters(self.config, f"worker {self.instance}"))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.config.broker.prefetch)
            broker.declare_topology(channel, self.config)
            on_message = functools.partial(self._on_message, connection)
            consumer_tag = channel.basic_consume(self.config.broker.queue, on_message)
            logger.info("Consuming from %s (prefetch %d).", self.config.broker.queue,
                        self.config.broker.prefetch)
            if not self._ready_sent:
                self.notifier.ready(self._idle_status())
                self._ready_sent = True
            else:
                self.notifier.status(self._idle_status())
            while not self._stop_requested:
                connection.process_data_events(time_limit=_TICK)
                self._tick()
            self._drain(connection, channel, consumer_tag)
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass

    def _drain(self, connection, channel, consumer_tag):
        """Graceful stop: take no new deliveries, hand back those not
        started, finish and ack the one in hand."""
        logger.info("Stopping: no new jobs; finishing the one in hand.")
        self.notifier.stopping("Finishing the job in hand before stopping.")
        channel.basic_cancel(consumer_tag)
        for tag, future in list(self._in_hand.items()):
            if future.cancel():
                del self._in_hand[tag]
                channel.basic_nack(tag, requeue=True)
        self._finish_in_hand(connection)

    def _finish_in_hand(self, connection):
        """Wait for the render thread's work, keeping I/O (and so the acks it
        schedules) flowing when there is a connection to flow on."""
        while self._in_hand:
            if connection is not None and connection.is_open:
                connection.process_data_events(time_limit=_TICK)
            else:
                for tag, future in list(self._in_hand.items()):
                    if future.done():
                        del self._in_hand[tag]
                time.sleep(_TICK)
            self._tick()

    # -- systemd --------------------------------------------------------------
    def _idle_status(self):
        return f"Waiting for jobs; {self.jobs_done} done, {self.jobs_failed} failed."

    def _tick(self):
        """Feed the watchdog while work makes progress. A render that has not
        moved for stall_timeout stops the pings, so systemd kills and
        restarts this worker and the broker redelivers its job."""
        if self.notifier.watchdog_interval is None:
            return
        now = time.monotonic()
        stalled = (self._current_job is not None and self._progress_at is not None
                   and now - self._progress_at > self.config.worker.stall_timeout)
        if stalled:
            return
        if now - self._last_ping >= min(self.notifier.watchdog_interval, 1.0):
            self.notifier.watchdog()
            self._last_ping = now

    def _progress(self):
        self._progress_at = time.monotonic()

    # -- one delivery ---------------------------------------------------------
    def _on_message(self, connection, channel, method, properties, body):
        tag = method.delivery_tag
        future = self._render_thread.submit(self._handle, body, method.redelivered)
        self._in_hand[tag] = future
        future.add_done_callback(functools.partial(self._settle, connection, channel, tag))

    def _settle(self, connection, channel, tag, future):
        """Runs in the render thread when a job ends: schedule its ack on
        the I/O thread."""
        if future.cancelled():
            return
        decision = future.result()

        def settle():
            self._in_hand.pop(tag, None)
            if not channel.is_open:
                return  # the broker redelivers it; our outputs are idempotent
            if decision == _Ack.ACK:
                channel.basic_ack(tag)
            elif decision == _Ack.DEAD_LETTER:
                channel.basic_reject(tag, requeue=False)
            else:
                channel.basic_nack(tag, requeue=True)
        try:
            connection.add_callback_threadsafe(settle)
        except pika.exceptions.ConnectionWrongStateError:
            # The connection is gone: nothing to ack on; the job is redelivered.
            self._in_hand.pop(tag, None)

    def _handle(self, body, redelivered):
        """Process one job; returns an _Ack decision. Never raises: an
        exception here would leave the delivery unsettled, and with prefetch
        1 the worker would wait for it forever while feeding the watchdog."""
        try:
            message = json.loads(body)
        except ValueError:
            message = None
        job_id = message.get("id") if isinstance(message, dict) else None
        if not is_job_id(job_id):
            logger.error("Dead-lettering a message that is not an imgworker job "
                         "(not a JSON object with a 32-hex-digit id): %r", body[:200])
            return _Ack.DEAD_LETTER
        try:
            return self._handle_job(job_id, redelivered)
        except Exception:  # noqa: BLE001 - a bug must not stall the worker
            logger.exception("Dead-lettering job %s after an unexpected error.", job_id)
            return _Ack.DEAD_LETTER

    def _handle_job(self, job_id, redelivered):
        log = JobLog(logger, job_id)
        job = self.storage.read_job(job_id)
        if job is None:
            # The API removes state and original when the broker did not
            # confirm (the client got 503), so there is nothing to do.
            log.warning("dropped: no such job in %s (its upload was refused).",
                        self.storage.root)
            return _Ack.ACK
        ingest.delivered(self.storage, job_id)
        if job.state.finished:
            # Finished before, but the ack was lost (crash, broker restart).
            log.info("already %s; acknowledging the redelivery.", job.state.value)
            return _Ack.ACK if job.state is State.DONE else _Ack.DEAD_LETTER

        attempts = job.attempts + 1
        max_attempts = self.config.worker.max_attempts
        if attempts > max_attempts:
            reason = (f"gave up after {max_attempts} attempts; the last one ended "
                      f"without a result (did the worker crash?)"
                      + (f"; earlier: {job.last_error}" if job.last_error else ""))
            return self._fail(job, log, reason)

        self._current_job, self._progress_at = job_id, time.monotonic()
        self.notifier.status(f"Processing job {job_id} (attempt {attempts}).")
        try:
            job.start(self.instance)
            if not self._when_space(log, lambda: self.storage.write_job(job)):
                return _Ack.REQUEUE
            log.info("processing (attempt %d of %d%s).", attempts, max_attempts,
                     ", redelivered" if redelivered else "")
            started = time.monotonic()
            original = self.storage.original_path(job_id)
            os.stat(original)   # a missing original fails the job (below), not the renderer
            outputs = self.renderer.render(original, self._progress)
            renditions = {
                output.rendition.name: {
                    "url": self.storage.rendition_url(job_id, output.rendition),
                    "width": output.width, "height": output.height,
                    "format": output.rendition.format, "bytes": len(output.data),
                } for output in outputs}
            job.finish(renditions, round(time.monotonic() - started, 3))

            def write_results():
                self.storage.write_renditions(
                    job_id, [(output.rendition, output.data) for output in outputs])
                self.storage.write_job(job)
            if not self._when_space(log, write_results):
                return _Ack.REQUEUE
            self.jobs_done += 1
            log.info("done in %.0f ms: %s.", 1000 * (time.monotonic() - started),
                     ", ".join(f"{name} {r['width']}x{r['height']}"
                               for name, r in renditions.items()))
            return _Ack.ACK
        except (images.BadImage, images.UnsupportedFormat) as error:
            return self._fail(job, log, f"the image cannot be processed: {error}")
        except RenderTimeout as error:
            return self._fail(job, log, str(error))
        except FileNotFoundError as error:
            if error.filename == self.storage.original_path(job_id):
                return self._fail(job, log, "the uploaded original is missing from storage")
            return self._retry(job, log, attempts, error)
        except Exception as error:  # noqa: BLE001 - bounded by max_attempts
            return self._retry(job, log, attempts, error)
        finally:
            self._current_job = None
            self.notifier.status(self._idle_status())

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
                    self.notifier.status(f"Waiting for space below {self.storage.root}.")
                    waiting = True
            deadline = time.monotonic() + self.config.worker.retry_delay
            while time.monotonic() < deadline:
                if self._stop_requested:
                    return False
                self._progress()
                time.sleep(_TICK)

    def _fail(self, job, log, reason):
        log.error("failed: %s", reason)
        self.jobs_failed += 1
        job.fail(reason)
        try:
            self.storage.write_job(job)
        except (OSError, StorageFull) as error:
            log.error("could not record the failure (%s); it is dead-lettered all the same.",
                      error)
        return _Ack.DEAD_LETTER

    def _retry(self, job, log, attempts, error):
        reason = str(error) or type(error).__name__
        if attempts >= self.config.worker.max_attempts:
            return self._fail(job, log, f"gave up after {attempts} attempts: {reason}")
        log.warning("attempt %d failed (%s); handing it back in %g s.",
                    attempts, reason, self.config.worker.retry_delay, exc_info=True)
        job.requeue(reason)
        try:
            self.storage.write_job(job)
        except (OSError, StorageFull):
            pass
        deadline = time.monotonic() + self.config.worker.retry_delay
        while time.monotonic() < deadline and not self._stop_requested:
            self._progress()
            time.sleep(_TICK)
        return _Ack.REQUEUE
