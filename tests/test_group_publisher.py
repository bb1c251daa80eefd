"""GroupPublisher's sharing of one publisher among threads. What the broker
does with the messages is tested against a real RabbitMQ (tests/integration,
tests/faults); here the publisher under it only records its batches."""

import threading
import time

import pytest

from harness.pipeline import wait_until
from imgworker import broker


class RecordingPublisher:
    """Stands in for broker.Publisher below GroupPublisher: each batch takes
    10 ms, as a confirm round trip does."""

    def __init__(self, refuse=(), explode=False):
        self.batches, self.refuse, self.explode = [], set(refuse), explode

    def publish_all(self, messages):
        self.batches.append([job_id for job_id, _body in messages])
        time.sleep(0.01)
        if self.explode:
            raise RuntimeError("a bug")
        return [broker.BrokerUnavailable("no queue took the message")
                if job_id in self.refuse else None for job_id, _body in messages]

    def check(self):
        self.batches.append("check")


def publish_from_threads(publisher, count):
    outcomes = {}

    def upload(number):
        try:
            publisher.publish(f"job{number}", b"{}")
            outcomes[number] = "confirmed"
        except broker.BrokerUnavailable as error:
            outcomes[number] = str(error)
    threads = [threading.Thread(target=upload, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "a publishing thread hangs"
    return outcomes


def test_threads_publishing_at_once_share_batches_and_each_hears_its_own_outcome():
    recording = RecordingPublisher(refuse={"job3"})
    outcomes = publish_from_threads(broker.GroupPublisher(recording), 24)
    assert outcomes[3] == "no queue took the message"
    assert all(outcomes[number] == "confirmed" for number in range(24) if number != 3)
    published = [job for batch in recording.batches for job in batch]
    assert sorted(published) == sorted(f"job{number}" for number in range(24))
    # one batch per message would be 24; those arriving during a batch go
    # out together in the next one
    assert len(recording.batches) <= 8


def test_a_publisher_bug_fails_its_batch_with_503s_instead_of_hanging_threads():
    outcomes = publish_from_threads(broker.GroupPublisher(RecordingPublisher(explode=True)), 8)
    assert set(outcomes.values()) == {"publisher error (RuntimeError('a bug'))"}


def test_a_health_check_waits_for_the_batch_in_flight():
    recording = RecordingPublisher()
    publisher = broker.GroupPublisher(recording)
    worker = threading.Thread(target=publisher.publish, args=("job0", b"{}"))
    worker.start()
    # within the 10 ms the batch is in flight
    wait_until(lambda: recording.batches, "the publishing thread's batch", 5, interval=0.0005)
    publisher.check()
    worker.join(5)
    assert recording.batches == [["job0"], "check"]


@pytest.mark.parametrize("failing", [False, True])
def test_publish_raises_what_publish_all_answered(failing):
    class One(broker.Publisher):
        def __init__(self):
            pass

        def publish_all(self, messages):
            return [broker.BrokerUnavailable("refused") if failing else None]
    if failing:
        with pytest.raises(broker.BrokerUnavailable, match="refused"):
            One().publish("job", b"{}")
    else:
        One().publish("job", b"{}")
