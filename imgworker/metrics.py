"""Prometheus metrics, summed over every API and worker process on the host.

prometheus_client's multiprocess mode: each process writes its samples to
files in the directory named by PROMETHEUS_MULTIPROC_DIR (the units set it
to /run/imgworker/metrics, a RuntimeDirectory= they share), and GET /metrics
on the API adds them all up, the files of processes that have exited
included, so counters never go down when a worker restarts. The variable
must be set before prometheus_client is imported: it is read then. Without
it (a process started by hand), each process counts only its own.

The queue gauges are read from the broker at each scrape.
"""

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, \
    generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import broker

#: Public contract: names and labels that dashboards and alerts rely on.
UPLOADS = Counter("imgworker_uploads", "Uploads answered by the API, by HTTP status.",
                  ["status"])
UPLOAD_SECONDS = Histogram("imgworker_upload_seconds",
                           "Seconds from an upload's request to the API's answer.",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOBS = Counter("imgworker_jobs", "Job attempts ended by a worker, by outcome: done, failed "
               "(for good), retried (handed back after a transient error).", ["outcome"])
RENDER_SECONDS = Histogram("imgworker_render_seconds", "Seconds a done job took to render.",
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

WEBHOOKS = Counter("imgworker_webhook_deliveries", "Webhook delivery attempts by outcome: "
                   "delivered, retried, dead (dead-lettered).", ["outcome"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


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


def exposition(config):
    """The text GET /metrics answers."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        for collector in (UPLOADS, UPLOAD_SECONDS, JOBS, RENDER_SECONDS, WEBHOOKS):
            registry.register(collector)
    registry.register(_QueueCollector(config))
    return generate_latest(registry)


def count_job(outcome, render_seconds=None):
    JOBS.labels(outcome).inc()
    if render_seconds is not None:
        RENDER_SECONDS.observe(render_seconds)


def count_upload(status, seconds):
    UPLOADS.labels(str(status)).inc()
    UPLOAD_SECONDS.observe(seconds)

