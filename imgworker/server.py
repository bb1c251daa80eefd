"""Runs the API under gunicorn (Debian's python3-gunicorn), configured from
config.ini rather than gunicorn's own flags, so one file configures it all."""

import ipaddress
import logging
import threading
import time

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from . import broker, units
from .api import Api

logger = logging.getLogger(__name__)

#: Seconds a new API worker waits for its pool threads to start.
_THREAD_START_TIMEOUT = 10


class _JoinedLogger(GunicornLogger):
    """Gunicorn's error log goes through our handlers (journald with fields,
    or stderr), not a second stream with its own timestamps. Access logs are
    nginx's job."""

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = log is self.error_log


class ApiServer(BaseApplication):
    def __init__(self, config, notifier):
        self.config = config
        self.notifier = notifier
        super().__init__()

    def load_config(self):
        settings = {
            "bind": [self.config.api.listen],
            "workers": self.config.api.workers,
            # Threads: an upload mostly waits (the storage's sync, the
            # broker's confirm), so one process overlaps many, and their
            # syncs and confirms are shared (storage.GroupSync,
            # broker.GroupPublisher). Measured in bench/results.
            "worker_class": "gthread",
            "threads": self.config.api.threads,
            "proc_name": "imgworker-api",
            "logger_class": _JoinedLogger,
            "when_ready": self._when_ready,
            "post_worker_init": self._start_every_thread,
            "on_exit": self._on_exit,
            # A request may wait config.broker.timeout for the broker, plus a
            # reconnect; anything far beyond is a stuck worker.
            "timeout": 30,
            # What the API unit's TimeoutStopSec is derived from (units.py).
            "graceful_timeout": units.API_GRACEFUL_TIMEOUT,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        return Api(self.config)

    def _start_every_thread(self, worker):
        """Start all of a worker's pool threads before it accepts, rather
        than as concurrency first reaches each: a process then has the
        threads and the memory it will keep from its start, and a thread
        started hours in is not mistaken for a leak (the soak's hour of
        2026-12-02 saw a quiet API process start its fifth thread at +21
        minutes and its sixth at +53)."""
        pool = getattr(worker, "tpool", None)       # gthread's ThreadPoolExecutor
        if pool is None:
            return
        threads = self.config.api.threads
        # Each task holds its thread until all have one, so the pool cannot
        # hand a second task to a thread it has already started.
        all_started = threading.Barrier(threads + 1)
        for _ in range(threads):
            pool.submit(all_started.wait, _THREAD_START_TIMEOUT)
        try:
            all_started.wait(_THREAD_START_TIMEOUT)
        except threading.BrokenBarrierError:
            logger.warning("Not all %d threads of API worker %d started within %d s; it "
                           "starts the rest as uploads arrive.", threads, worker.pid,
                           _THREAD_START_TIMEOUT)

    def _when_ready(self, _arbiter):
        self.notifier.ready(f"Accepting uploads on {self.config.api.listen}.")

    def _on_exit(self, _arbiter):
        self.notifier.stopping("Stopped accepting uploads.")


def wait_for_broker(config, notifier, should_stop=lambda: False):
    """Block until the broker answers and the queues are declared, with
    capped exponential backoff, so the unit turns active only when it can
    take uploads."""
    delay = 1.0
    while True:
        publisher = broker.Publisher(config)
        try:
            publisher.check()
            return
        except broker.BrokerUnavailable as error:
            logger.warning("Waiting for the broker: %s. Next try in %.0f s.", error, delay)
            notifier.status(f"Waiting for the broker: {error}")
        finally:
            publisher.close()
        if should_stop():
            raise SystemExit(1)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def _warn_unless_loopback(listen):
    """Only nginx should reach the API: it holds slow clients off and
    buffers bodies. Say so in the journal when the API listens further."""
    host = listen.rpartition(":")[0].strip("[]")    # HOST:PORT, checked by config
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        logger.warning("[api] listen = %s is not a loopback address: clients can reach the "
                       "API without nginx, which limits their bodies and their time. Listen "
                       "on 127.0.0.1 and let nginx face the network.", listen)


def run(config, notifier):
    _warn_unless_loopback(config.api.listen)
    wait_for_broker(config, notifier)
    logger.info("Broker reachable; starting the API on %s.", config.api.listen)
    ApiServer(config, notifier).run()
