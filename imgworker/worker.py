"""The consumer: the connection to RabbitMQ, and the process around it.

It takes deliveries and settles them as the job policy (policy.py) decides;
what happens to a job is decided there, not here.

Threads, as in pika's ``basic_consumer_threaded`` example:
- the main thread owns the connection; it runs pika's I/O (heartbeats
  included), reconnects with backoff, signals, systemd notifications and the
  watchdog;
- one render thread runs the first step of the policy (read the job, count
  the attempt, render), so a long job never starves the heartbeat;
- one finish thread runs the second (make the renditions the renderer
  staged, and the record, durable), so the next job's render overlaps the
  last one's fsyncs;
  it hands the ack back with ``add_callback_threadsafe``. With [broker]
  prefetch 2 the next delivery is already there when a render ends.

A job is acked only after the policy has made its renditions and record
durable; a crash before that means the broker redelivers it, and the
deterministic paths make the second run overwrite the first. The image work
runs in a child process (renderer.py), so a decoder that hangs or crashes
costs one job attempt, never the worker.
"""

import functools
import logging
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pika
import pika.exceptions

from . import broker, images, metrics, waits
from .policy import Decision, JobPolicy, Outcome, Rendered
from .renderer import Renderer
from .storage import Erased, Storage

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config, instance, notifier):
        metrics.count_worker_start(instance)        # counted before anything can fail
        self.config = config
        self.instance = instance
        self.notifier = notifier
        self._render_thread = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._finish_thread = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self.renderer = Renderer(config.storage.root, config.renditions,
                                 images.Limits.from_config(config), config.worker.job_timeout)
        self.policy = JobPolicy(config, instance, Storage(config.storage.root),
                                self.renderer.render, status=notifier.status,
                                stopping=lambda: self._stop_requested)
        # delivery tag -> (its render-thread Future: cancelled while not
        # started, its Outcome Future), on the current channel
        self._in_hand = {}
        # monotonic time a delivery last arrived, or one in hand moved a
        # step: what the watchdog watches when the policy holds no job
        self._last_moved = time.monotonic()
        self._events = None         # the confirmed channel events go out on
        self._stop_requested = False
        self._ready_sent = False
        self._last_ping = 0.0

    # -- lifecycle --------------------------------------------------------
    def _on_signal(self, signum, _frame):
        if self._stop_requested:
            # A second SIGTERM/SIGINT: the operator wants out now. The job in
            # hand is unacked, so the broker gives it to another worker.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self._stop_requested = True

    def _handle_signals(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def wait_for_storage(self):
        """Before becoming ready: wait until the storage root is the one the
        API writes to (storage.MARKER). False if asked to stop meanwhile.
        systemd's TimeoutStartSec= fails and restarts a unit that waits too
        long, so the journal says why every time."""
        self._handle_signals()
        storage = self.policy.storage

        def waiting():
            logger.error("Not ready: %s has no %s, so it is not the storage the API writes to "
                         "(is the shared storage mounted? has the API ever run on it?). "
                         "Waiting for it.", storage.root, os.path.basename(storage.marker_path))
            self.notifier.status(f"Waiting for the storage: {storage.root} is not the API's "
                                 "(shared storage not mounted?)")
        return waits.until(storage.is_shared_root, lambda: self._sleep(1.0), waiting,
                           lambda: logger.info("%s is the API's storage now; carrying on.",
                                               storage.root))

    def run(self):
        """Consume until SIGTERM; returns the process exit status."""
        self._handle_signals()
        backoff = 1.0
        while not self._stop_requested:
            try:
                self._consume()
                backoff = 1.0
            except (pika.exceptions.AMQPError, OSError) as error:
                if self._stop_requested:
                    break
                broker.report_lost(error, backoff, self.notifier)
                # Deliveries of a lost channel are the broker's again: a job
                # not started yet is left to whoever gets it next.
                for tag, (begun, _outcome) in list(self._in_hand.items()):
                    if begun.cancel():
                        del self._in_hand[tag]
                self._finish_in_hand(connection=None)
                self._sleep(backoff)
                backoff = min(backoff * 2, broker.MAX_RECONNECT_BACKOFF)
        done, failed = self.policy.jobs_done, self.policy.jobs_failed
        self.notifier.stopping(f"Stopped after {done} jobs done, {failed} failed.")
        logger.info("Stopped: %d jobs done, %d failed.", done, failed)
        self._render_thread.shutdown(wait=True)
        self._finish_thread.shutdown(wait=True)
        self.renderer.stop()
        return 0

    def _sleep(self, seconds):
        """Wait, feeding the watchdog; False if asked to stop meanwhile."""
        return waits.pause(seconds, lambda: self._stop_requested, self._tick)

    def _consume(self):
        connection = pika.BlockingConnection(broker.parameters(self.config, f"worker {self.instance}"))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.config.broker.prefetch)
            broker.declare_topology(channel, self.config)
            self._events = connection.channel()
            self._events.confirm_delivery()
            on_message = functools.partial(self._on_message, connection)
            consumer_tag = channel.basic_consume(self.config.broker.queue, on_message)
            logger.info("Consuming from %s (prefetch %d).", self.config.broker.queue,
                        self.config.broker.prefetch)
            if not self._ready_sent:
                self.notifier.ready(self.policy.idle_status())
                self._ready_sent = True
            else:
                self.notifier.status(self.policy.idle_status())
            while not self._stop_requested:
                connection.process_data_events(time_limit=waits.TICK)
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
        started, finish and ack those in hand (one rendering, one being
        written)."""
        logger.info("Stopping: no new jobs; finishing those in hand.")
        self.notifier.stopping("Finishing the jobs in hand before stopping.")
        channel.basic_cancel(consumer_tag)
        for tag, (begun, _outcome) in list(self._in_hand.items()):
            if begun.cancel():
                del self._in_hand[tag]
                channel.basic_nack(tag, requeue=True)
        self._finish_in_hand(connection)

    def _finish_in_hand(self, connection):
        """Wait for the jobs in hand to end, keeping I/O (and so the acks
        they schedule) flowing when there is a connection to flow on."""
        while self._in_hand:
            if connection is not None and connection.is_open:
                connection.process_data_events(time_limit=waits.TICK)
            else:
                for tag, (_begun, outcome) in list(self._in_hand.items()):
                    if outcome.done():
                        del self._in_hand[tag]
                time.sleep(waits.TICK)
            self._tick()

    # -- systemd --------------------------------------------------------------
    def _tick(self):
        """Feed the watchdog while work makes progress. A job in hand that
        has not moved for stall_timeout (a render, or a write to storage
        that hangs) stops the pings, so systemd kills and restarts this
        worker and the broker redelivers its jobs."""
        if self.notifier.watchdog_interval is None:
            return
        silence = self._silence()
        if silence is not None and silence > self.config.worker.stall_timeout:
            return
        now = time.monotonic()
        if now - self._last_ping >= min(self.notifier.watchdog_interval, 1.0):
            self.notifier.watchdog()
            self._last_ping = now

    def _silence(self):
        """Seconds the work in hand has not moved: the policy's measure while
        it holds a job; else, with deliveries in hand that no step holds
        (each should be settled at once), the time since one last moved. A
        delivery that is never settled thus stops the pings too, instead of
        a loop waiting for it forever while systemd hears all is well."""
        silence = self.policy.silence()
        if silence is None and self._in_hand:
            return time.monotonic() - self._last_moved
        return silence

    # -- one delivery ---------------------------------------------------------
    def _on_message(self, connection, channel, method, properties, body):
        tag = method.delivery_tag
        outcome = Future()
        outcome.add_done_callback(functools.partial(self._settle, connection, channel, tag))
        self._last_moved = time.monotonic()
        begun = self._render_thread.submit(self._settling, outcome, self._begin, body,
                                           method.redelivered, outcome)
        self._in_hand[tag] = (begun, outcome)

    def _settling(self, outcome, step, *args):
        """Run one step of a delivery so that, whatever it raises, the
        delivery is settled: handed back, with the reason in the journal.
        The policy counts attempts before its work, so a job that fails
        this way every time still ends failed after max_attempts; a step
        that already decided (the policy's Outcome is set) stands."""
        try:
            step(*args)
        except Exception as error:  # noqa: BLE001 - an unsettled delivery is held forever
            if not outcome.done():
                logger.exception("A delivery could not be handled (%s: %s); handing it back.",
                                 type(error).__name__, error)
                outcome.set_result(Outcome(Decision.REQUEUE))
            else:
                logger.exception("Error after a delivery was settled.")

    def _begin(self, body, redelivered, outcome):
        """In the render thread: the policy's first step. A rendered job goes
        on to the finish thread, and this thread to the next delivery."""
        begun = self.policy.begin(body, redelivered)
        self._last_moved = time.monotonic()
        if isinstance(begun, Rendered):
            self._finish_thread.submit(self._settling, outcome, self._finish, begun, outcome)
        else:
            self._ended(begun, outcome)

    def _finish(self, rendered, outcome):
        """In the finish thread: the policy's second step."""
        self._ended(self.policy.finish(rendered), outcome)

    def _ended(self, result, outcome):
        self._last_moved = time.monotonic()
        try:
            if result.counted == "done":
                metrics.count_job("done", result.ended.seconds)
            elif result.counted is not None:
                metrics.count_job(result.counted)
        except Exception:  # noqa: BLE001 - a count lost must not leave the job unsettled
            logger.exception("Could not count a job's end in the metrics.")
        outcome.set_result(result)

    def _publish_event(self, job):
        """On the I/O thread: the job's end to the events exchange, confirmed.
        False if the broker refused it, None if the job was erased (nothing
        sent)."""
        routing_key, body, properties = broker.job_event(job)
        try:
            # Under the job's lock, and only if it was not erased: an
            # erasure's job.deleted then never comes before this event.
            with self.policy.storage.unless_erased(job.id):
                self._events.basic_publish(broker.EVENTS_EXCHANGE, routing_key, body, properties)
        except Erased:
            logger.info("Job %s was erased: its %s event is not sent.", job.id, routing_key)
            return None
        except pika.exceptions.NackError:
            logger.warning("The broker refused the %s event of job %s; the job is handed "
                           "back, and its event sent again.", routing_key, job.id)
            return False
        return True

    def _settle(self, connection, channel, tag, outcome):
        """Runs in the thread that ended the job: schedule its event and its
        ack on the I/O thread."""
        decision, ended, _counted = outcome.result()

        def settle():
            self._in_hand.pop(tag, None)
            self._last_moved = time.monotonic()
            if not channel.is_open:
                return  # the broker redelivers it; our outputs are idempotent
            # The event before the ack: dying in between sends it twice
            # (the redelivery finds the job ended and sends it again), never
            # zero times.
            sent = True if ended is None else self._publish_event(ended)
            if sent is False:
                channel.basic_nack(tag, requeue=True)
                return
            if decision is Decision.ACK or sent is None:    # None: erased, nothing to keep
                channel.basic_ack(tag)
            elif decision is Decision.DEAD_LETTER:
                channel.basic_reject(tag, requeue=False)
            else:
                channel.basic_nack(tag, requeue=True)
        try:
            connection.add_callback_threadsafe(settle)
        except pika.exceptions.ConnectionWrongStateError:
            # The connection is gone: nothing to ack on; the job is redelivered.
            self._in_hand.pop(tag, None)
