"""The consumer's own promises, without a broker: every delivery is settled
whatever a step raises, and the watchdog stops when a delivery in hand
stops moving. The broker's side is a recorder of what the worker asked of
the channel (tests/integration/test_worker.py has the real one)."""

import threading
import time
import types

import pytest

from imgworker import config
from imgworker.policy import Decision, Outcome, Rendered
from imgworker.worker import Worker


class _Notifier:
    """sd_notify as systemd would hear it, with WatchdogSec= set."""
    watchdog_interval = 0.01

    def __init__(self):
        self.pings = 0

    def watchdog(self):
        self.pings += 1

    def status(self, _text):
        pass

    ready = stopping = status


class _Channel:
    """What the worker asked of the broker for each delivery tag."""
    is_open = True

    def __init__(self):
        self.settled = {}

    def _record(self, tag, how):
        self.settled[tag] = how

    def basic_ack(self, tag):
        self._record(tag, "ack")

    def basic_nack(self, tag, requeue):
        self._record(tag, "requeue" if requeue else "dead-letter")

    def basic_reject(self, tag, requeue):
        self._record(tag, "requeue" if requeue else "dead-letter")


class _Connection:
    """pika's add_callback_threadsafe: the callbacks wait for the I/O
    thread, the test's, as they would in pika."""

    def __init__(self):
        self.callbacks = []
        self.arrived = threading.Event()

    def add_callback_threadsafe(self, callback):
        self.callbacks.append(callback)
        self.arrived.set()

    def process_data_events(self, timeout=5):
        assert self.arrived.wait(timeout), "the delivery was never settled"
        while self.callbacks:
            self.callbacks.pop(0)()


@pytest.fixture
def worker(tmp_path):
    settings = config.from_dict({"storage": {"root": str(tmp_path)},
                                 "worker": {"stall_timeout": "0.3"}})
    made = Worker(settings, "1", _Notifier())
    yield made
    made._render_thread.shutdown(wait=False)
    made._finish_thread.shutdown(wait=False)


def _deliver(worker, channel, tag=1, body=b'{"id": "0123456789abcdef0123456789abcdef"}'):
    connection = _Connection()
    worker._on_message(connection, channel, types.SimpleNamespace(delivery_tag=tag,
                                                                  redelivered=False),
                       None, body)
    return connection


def test_a_step_that_raises_hands_the_delivery_back_and_says_why(worker, caplog):
    def broken(_body, _redelivered):
        raise RuntimeError("a bug in the policy")
    worker.policy.begin = broken
    channel = _Channel()
    _deliver(worker, channel).process_data_events()
    assert channel.settled == {1: "requeue"}
    assert worker._in_hand == {}
    assert "a bug in the policy" in caplog.text and "handing it back" in caplog.text


def test_a_finish_step_that_cannot_start_hands_the_delivery_back(worker, caplog):
    worker.policy.begin = lambda _body, _redelivered: Rendered(None, None, None, None, 0.0, 0.0)
    worker._finish_thread.shutdown()    # submit() now raises, as after a stop
    channel = _Channel()
    _deliver(worker, channel).process_data_events()
    assert channel.settled == {1: "requeue"}
    assert "handing it back" in caplog.text


def test_the_watchdog_stops_when_a_delivery_in_hand_stops_moving(worker):
    stuck = threading.Event()
    worker.policy.begin = lambda _body, _redelivered: (stuck.wait(), Outcome(Decision.ACK))[1]
    channel = _Channel()
    _deliver(worker, channel)
    try:
        worker._tick()
        assert worker.notifier.pings == 1          # a delivery just arrived: all is well
        time.sleep(0.5)                           # past stall_timeout (0.3 s) with no step
        pings = worker.notifier.pings
        for _ in range(5):
            worker._tick()
            time.sleep(0.02)
        assert worker.notifier.pings == pings, "the watchdog was fed for a stuck delivery"
    finally:
        stuck.set()
