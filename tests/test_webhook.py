"""The webhook sender's own rules, without a broker: which events it sends,
and how long one POST may take."""

import time
import types

import pytest

from imgworker import broker, webhook
from imgworker.job import Job, State
from tests.integration.test_webhooks import TrickleReceiver


def test_the_sender_accepts_exactly_the_routing_keys_workers_and_erasures_publish():
    from imgworker import erasure
    published = {broker.job_event(Job("0" * 32, state, {"format": "jpeg"}))[0]
                 for state in State if state.finished}
    published.add(erasure.deleted_event({"id": "0" * 32, "owner": "o", "reason": "request"})[0])
    assert webhook.EVENTS == published == {"job.done", "job.failed", "job.deleted"}


def test_one_post_to_a_receiver_trickling_its_answer_ends_at_the_timeout():
    # Given a receiver answering one byte every 0.5 s, and a 1 s timeout
    receiver = TrickleReceiver()
    config = types.SimpleNamespace(webhook=types.SimpleNamespace(
        url=receiver.url, secret="s", timeout=1.0))
    started = time.monotonic()
    # When an event is POSTed, Then the attempt is given up as a timeout
    with pytest.raises(webhook.Retry, match=r"no answer within 1 s \(\[webhook\] timeout\)"):
        webhook.post(config, "job.done", b"{}")
    assert time.monotonic() - started < 1 + 0.5
    receiver.server.shutdown()
