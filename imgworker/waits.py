"""Waits that a stop request cuts short, for the long-running roles (worker,
job policy, webhook sender): one loop, so each of them stops within a tick
of SIGTERM and keeps showing progress (a watchdog, heartbeats) while it
waits."""

import time

#: Longest sleep between looks at the stop flag: SIGTERM is acted on within it.
TICK = 0.5


def pause(seconds, stopping, between=lambda: None, sleep=time.sleep):
    """Wait ``seconds``; ``between()`` runs before each step (progress, the
    watchdog) and ``sleep(step)`` does the waiting (pika's
    ``connection.sleep`` keeps heartbeats going). False as soon as
    ``stopping()`` is true, else True."""
    deadline = time.monotonic() + seconds
    while not stopping():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        between()
        sleep(min(TICK, remaining))
    return False


def until(condition, pause_once, waiting, back):
    """True once ``condition()`` holds, looking again after each
    ``pause_once()`` (False from it: stop, and return False). ``waiting()``
    says why, once, before the first pause; ``back()``, that the wait is
    over."""
    if condition():
        return True
    waiting()
    while not condition():
        if not pause_once():
            return False
    back()
    return True
