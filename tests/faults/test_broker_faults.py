"""The broker misbehaves under load: killed, alarmed, slow to heartbeat.
Every 202 must still end in renditions."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse

import pytest

from harness import samples
from harness.cluster import Node, wait_exited
from harness.ledger import Ledger
from harness.pipeline import wait_until

#: The bystander's number in harness/cluster.py's port plan: clear of the
#: cluster tests' nodes 1 to 3, which may be running beside this test.
BYSTANDER = 9


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


@pytest.fixture
def local_broker(amqp_url):
    """The test broker runs here and may be killed and restarted: the node
    rabbitmqctl reaches, once it is sure that node is the one at amqp_url."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to break and mend the test broker")
    port = urllib.parse.urlsplit(amqp_url).port or 5672
    listeners = subprocess.run(["rabbitmq-diagnostics", "-q", "listeners"], check=True,
                               capture_output=True, text=True, timeout=120).stdout
    if f"port: {port}, protocol: amqp" not in listeners:
        pytest.fail(f"rabbitmqctl's node does not serve {amqp_url} (it listens on: {listeners});"
                    " breaking it would break a broker the test does not use")
    yield
    if subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode != 0:
        start_broker()
    rabbitmqctl("set_disk_free_limit", "50MB")


@pytest.fixture
def bystander():
    """Another RabbitMQ on the machine, as a developer's own or a cluster
    test's node would be: what the test breaks must spare it."""
    directory = tempfile.mkdtemp(prefix="imgworker-bystander-", dir="/var/tmp")
    node = Node(BYSTANDER, directory)
    node.prepare()
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", directory], check=True)
    try:
        node.start()
        yield node
    finally:
        if node.is_running():
            node.stop()
        shutil.rmtree(directory, ignore_errors=True)


def start_broker():
    subprocess.run(["rabbitmq-server", "-detached"], check=True, capture_output=True)
    # await_startup needs the node to exist already; right after -detached
    # it may not yet, and then it answers 69 (unavailable) at once.
    deadline = time.monotonic() + 120
    while subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", "60"],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "the broker did not come back"
        time.sleep(0.5)


def kill_9_the_broker():
    """SIGKILL the test broker's beam.smp, by its PID: never a pkill of
    beam.smp, which takes every RabbitMQ on the machine with it."""
    pid = int(rabbitmqctl("-q", "eval", "list_to_integer(os:getpid()).").strip())
    os.kill(pid, signal.SIGKILL)
    assert wait_exited(pid), f"the broker's beam.smp ({pid}) outlived SIGKILL by 30 s"


def wait_accepted(ledger, count, timeout=120):
    """Wait until ``count`` uploads in all got their 202."""
    wait_until(lambda: len(ledger.accepted) >= count, f"{count} uploads accepted", timeout)


def test_a_job_twice_as_long_as_the_heartbeat_keeps_its_connection_and_is_delivered_once(make_pipeline):
    # heartbeat 1 s; the job renders for several seconds
    pipeline = make_pipeline(broker={"heartbeat": "1"},
                             renditions={"huge": "6000x6000 fit webp 100"})
    pipeline.start_api()
    worker = pipeline.start_worker()
    ledger = Ledger.for_pipeline(pipeline, "9. job of 2x+ the heartbeat")
    ledger.photo = samples.jpeg(5000, 3500, quality=90)
    ledger.upload()
    counters = ledger.check()
    job = pipeline.read_job(ledger.accepted[0])
    assert job.seconds > 2, "the job must outlast two heartbeats"
    assert (counters.done, counters.lost, counters.duplicated) == (1, 0, 0)
    assert worker.log().count("processing (attempt") == 1
    assert "Lost the broker" not in worker.log()


def test_kill_9_of_the_broker_mid_publish_loses_no_confirmed_job(make_pipeline, local_broker,
                                                                 bystander):
    spared = bystander.os_pid()
    pipeline = make_pipeline()
    pipeline.start_api()
    pipeline.start_worker(1)
    pipeline.start_worker(2)
    ledger = Ledger.for_pipeline(pipeline, "4. kill -9 beam.smp x5")
    # Uploads flow until the last round is over, however long the broker
    # takes to boot, and each kill waits until uploads are accepted again
    # (the API publishes), so every kill lands mid-publish
    stop = threading.Event()
    load = ledger.run_load(count=100_000, per_second=20, stop=stop)
    for _ in range(5):
        wait_accepted(ledger, len(ledger.accepted) + 40)
        kill_9_the_broker()
        start_broker()
    wait_accepted(ledger, len(ledger.accepted) + 40)
    stop.set()
    load.join()
    counters = ledger.check(settle_timeout=180)
    print(counters.notes[:10])
    assert counters.lost == 0 and counters.corrupt == 0 and counters.unexpected == 0
    assert counters.accepted > 100 and counters.refused.get(503, 0) > 0
    assert set(counters.refused) <= {503}    # refused = 503 + Retry-After, never a 5xx
    assert ledger.slowest_refusal() < 5
    # and the other RabbitMQ on the machine still runs, the same process
    assert bystander.is_running() and bystander.os_pid() == spared, \
        f"the kills took {bystander.name}, a RabbitMQ the test does not use, with them"


def test_a_disk_alarm_gets_503_within_5_s_and_nothing_accepted_is_lost(make_pipeline, local_broker):
    pipeline = make_pipeline()
    pipeline.start_api()
    pipeline.start_worker()
    ledger = Ledger.for_pipeline(pipeline, "5. disk free alarm")
    load = ledger.run_load(count=300, per_second=10)
    wait_accepted(ledger, 20)
    rabbitmqctl("set_disk_free_limit", "100000GB")
    alarm_raised = time.monotonic()
    wait_until(lambda: "disk" in rabbitmqctl("-q", "eval", "rabbit_alarm:get_alarms()."),
               "RabbitMQ to raise its disk alarm", timeout=20, interval=0.2)
    # The window under test, not a wait: uploads go on arriving under the
    # alarm, and every one of them must be refused
    time.sleep(8)
    during = [status for started, _, status in ledger.responses if started > alarm_raised + 1]
    rabbitmqctl("set_disk_free_limit", "50MB")
    load.join()
    counters = ledger.check()
    assert during and all(status == 503 for status in during), during
    assert ledger.slowest_refusal(since=alarm_raised) < 5
    assert counters.lost == 0 and counters.corrupt == 0 and counters.unexpected == 0
    # and uploads flow again once the alarm cleared
    assert ledger.responses[-1][2] == 202
    assert re.search(r"blocked|alarm", " ".join(str(n) for n in counters.notes) +
                     pipeline.services[0].log())
