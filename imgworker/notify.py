"""Talking to systemd through sd_notify: readiness, status, watchdog.

Off systemd (no NOTIFY_SOCKET: a laptop, CI, a shell) every call is a no-op,
so the same code runs everywhere. Under ``Type=notify`` the unit turns
``active`` only when READY=1 arrives, which the api and worker send once the
broker is reachable and the queues exist.
"""

import os

import sdnotify


class Notifier:
    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # Never wait on the notify socket: a reader that falls behind
            # (its datagram queue is short) would otherwise block the job
            # thread in send(). A dropped STATUS or WATCHDOG is replaced by
            # the next one within a second; sdnotify swallows the EAGAIN.
            self._notifier.socket.setblocking(False)
        self.watchdog_interval = self._watchdog_interval()

    @staticmethod
    def _watchdog_interval():
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, as
        sd_watchdog_enabled(3) advises; None when no watchdog is set for us."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    def _send(self, message):
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status):
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status):
        self._send(f"STATUS={status}")

    def watchdog(self):
        self._send("WATCHDOG=1")

    def stopping(self, status):
        self._send(f"STOPPING=1\nSTATUS={status}")
