"""Prometheus metrics, summed over every API, worker and webhook process on
the host.

prometheus_client's multiprocess mode: each process keeps its samples in
files below ``[storage] metrics_dir``, and GET /metrics on the API adds them
all up. Each process calls ``setup(config)`` before it counts anything, so
this holds however it was started: under the shipped units, by hand, in a
container or under another supervisor.

The files are named by a *slot*, not by a PID: a process takes the lowest
slot whose lock no live process holds, and opens that slot's files where
the last holder left them. So the directory holds as many sets of files as
processes ever ran at once, whatever the restarts, and a counter never goes
down when a process dies: its successor in the slot counts on from there.
(prometheus_client's own remedy, ``mark_process_dead``, cleans up live
gauges only; deleting a dead process's files would take its counts away.)

The queue gauges are asked of the broker at each scrape.
"""

import fcntl
import itertools
import os
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, \
    generate_latest, values
from prometheus_client.core import GaugeMetricFamily

from . import auth, broker

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Families:
    """Public contract: names and labels that dashboards and alerts rely on.
    Made only once the process knows where its samples go (``setup``): a
    metric takes prometheus_client's value class when it is made."""

    def __init__(self):
        self.uploads = Counter("imgworker_uploads", "Uploads answered by the API, by HTTP status.",
                               ["status"])
        self.upload_seconds = Histogram(
            "imgworker_upload_seconds", "Seconds from an upload's request to the API's answer.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.jobs = Counter("imgworker_jobs", "Job attempts ended by a worker, by outcome: done, "
                            "failed (for good), retried (handed back after a transient error).",
                            ["outcome"])
        self.render_seconds = Histogram(
            "imgworker_render_seconds", "Seconds a done job took to render.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.webhooks = Counter("imgworker_webhook_deliveries", "Webhook delivery attempts by "
                                "outcome: delivered, retried, dead (dead-lettered).", ["outcome"])
        self.auth_refusals = Counter("imgworker_auth_refusals", "Requests refused for their "
                                     "credentials, by reason: " + ", ".join(auth.REASONS) + ".",
                                     ["reason"])
        for reason in auth.REASONS:     # every series exists from the start, at 0
            self.auth_refusals.labels(reason)
        self.erased = Counter("imgworker_erased", "Jobs erased, by reason: request (DELETE, "
                              "imgworker erase) or retention (imgworker gc).", ["reason"])
        for reason in ("request", "retention"):
            self.erased.labels(reason)
        self.worker_starts = Counter("imgworker_worker_starts", "Worker processes started, by "
                                     "their --instance: a worker that keeps restarting "
                                     "shows here (the slot files outlive each process).",
                                     ["worker"])
        self.originals_removed = Counter("imgworker_originals_removed", "Originals removed by "
                                         "imgworker gc after [retention] originals; their "
                                         "jobs' renditions stay.")

    def register_in(self, registry):
        for family in vars(self).values():
            registry.register(family)


_lock = threading.Lock()
_families = None
_directory = None       # [storage] metrics_dir, once setup() ran


class _Slot:
    """prometheus_client's process identifier: this process's slot in the
    metrics directory, held by an flock on ``slot-N.lock`` for the life of
    the process. Asked again after a fork (gunicorn's workers), where the
    child must take a slot of its own: its parent's lock, inherited, is the
    parent's."""

    def __init__(self, directory):
        self._directory = directory
        self._pid = None
        self._slot = None

    def __call__(self):
        if self._pid != os.getpid():
            self._slot = self._take()
            self._pid = os.getpid()
        return self._slot

    def _take(self):
        for slot in itertools.count():
            fd = os.open(os.path.join(self._directory, f"slot-{slot}.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return str(slot)    # the descriptor stays open: the lock is ours until exit


def setup(config):
    """Before this process counts anything: its samples go to a slot of
    ``[storage] metrics_dir``, which is created if missing."""
    global _directory, _families
    directory = config.storage.metrics_dir
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with _lock:
        if _families is not None:
            raise RuntimeError("metrics.setup() after the first count")
        # prometheus_client opens each process's files below this variable.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        values.ValueClass = values.MultiProcessValue(_Slot(directory))
        _directory = directory
        _families = _Families()


def _get():
    """The metric families; a process that never called setup() (a test,
    a tool) counts only in its own memory."""
    global _families
    with _lock:
        if _families is None:
            _families = _Families()
        return _families


class _QueueCollector:
    """imgworker_queue_messages and imgworker_queue_consumers, asked of the
    broker when scraped; imgworker_broker_up says whether it answered."""

    def __init__(self, config):
        self._config = config

    def collect(self):
        from .status import queues      # status imports nothing of the API
        up = GaugeMetricFamily("imgworker_broker_up",
                               "1 if the broker answered this scrape, else 0.")
        messages = GaugeMetricFamily("imgworker_queue_messages",
                                     "Messages ready in the queue.", labels=["queue"])
        consumers = GaugeMetricFamily("imgworker_queue_consumers",
                                      "Consumers of the queue.", labels=["queue"])
        try:
            found = queues(self._config)
        except broker.BrokerUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        for queue, counts in found.items():
            if counts is not None:
                messages.add_metric([queue], counts["messages"])
                consumers.add_metric([queue], counts["consumers"])
        yield from (up, messages, consumers)


class _StorageCollector:
    """What the storage holds, as the sweep last measured it (it walks the
    tree every few minutes; a scrape only reads its figure), and the
    filesystem's size and free space, read at the scrape."""

    KINDS = ("originals", "renditions", "records")

    def __init__(self, config):
        self._root = config.storage.root

    def collect(self):
        from .storage import Storage
        usage = Storage(self._root).usage() or {}
        stored = GaugeMetricFamily("imgworker_stored_bytes", "Bytes of originals, renditions "
                                   "and job records on the storage, as last measured.",
                                   labels=["kind"])
        files = GaugeMetricFamily("imgworker_stored_files", "Files of originals, renditions "
                                  "and job records on the storage, as last measured.",
                                  labels=["kind"])
        for kind in self.KINDS:
            if kind in usage:
                stored.add_metric([kind], usage[kind]["bytes"])
                files.add_metric([kind], usage[kind]["files"])
        yield from (stored, files)
        if "at" in usage:
            yield GaugeMetricFamily("imgworker_stored_measured_timestamp_seconds",
                                    "When the stored figures were measured (the sweep).",
                                    value=usage["at"])
        if "filesystem" in usage:
            yield GaugeMetricFamily("imgworker_storage_size_bytes",
                                    "Size of the storage's filesystem.",
                                    value=usage["filesystem"]["size"])
            yield GaugeMetricFamily("imgworker_storage_free_bytes", "Bytes of the storage's "
                                    "filesystem free for imgworker.",
                                    value=usage["filesystem"]["free"])


def exposition(config):
    """The text GET /metrics answers: every process's samples below the
    metrics directory, or this process's own if it has none."""
    registry = CollectorRegistry()
    if _directory is not None:
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry, path=_directory)
    else:
        _get().register_in(registry)
    registry.register(_QueueCollector(config))
    registry.register(_StorageCollector(config))
    return generate_latest(registry)


def count_job(outcome, render_seconds=None):
    families = _get()
    families.jobs.labels(outcome).inc()
    if render_seconds is not None:
        families.render_seconds.observe(render_seconds)


def count_upload(status, seconds):
    families = _get()
    families.uploads.labels(str(status)).inc()
    families.upload_seconds.observe(seconds)


def count_webhook(outcome):
    _get().webhooks.labels(outcome).inc()


def count_auth_refusal(reason):
    _get().auth_refusals.labels(reason).inc()


def count_worker_start(instance):
    _get().worker_starts.labels(str(instance)).inc()


def count_erased(reason):
    _get().erased.labels(reason).inc()


def count_original_removed():
    _get().originals_removed.inc()
