"""Runs the API under gunicorn (Debian's python3-gunicorn), configured from
config.ini rather than gunicorn's own flags, so one file configures it all."""

import ipaddress
import logging
import time

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger as GunicornLogger

from . import broker, units
from .api import Api

logger = logging.getLogger(__name__)


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
