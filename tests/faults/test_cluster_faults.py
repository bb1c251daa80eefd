"""A three-node RabbitMQ cluster with quorum queues loses a node while
uploads arrive: every 202 must still end in renditions.

The nodes run on this machine (harness/cluster.py), each with its own name,
ports and data directory; the API and two workers are given all three URLs.
Each scenario runs over at least MIN_JOBS accepted jobs and checks the
ledger's counters, how long the front door answered 503 in a row, and how
long the workers took to consume again after each loss.
"""

import tempfile
import threading
import time

import pytest

from harness.cluster import Cluster, NodeDown
from harness.ledger import Ledger
from harness.pipeline import Pipeline, wait_until

MIN_JOBS = 1000
UPLOADS_PER_SECOND = 25
WORKERS = 2

#: (scenario, event, seconds until both workers consumed again)
RECOVERIES = []


@pytest.fixture(scope="module")
def cluster():
    directory = tempfile.mkdtemp(prefix="imgworker-cluster-", dir="/var/tmp")
    cluster = Cluster(directory)
    try:
        cluster.start()
    except (NodeDown, OSError) as error:
        cluster.stop()
        pytest.fail(f"cannot run a RabbitMQ cluster here: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_pipeline(cluster, tmp_path):
    for node in cluster.nodes:          # an earlier scenario may have failed midway
        if not node.is_running():
            node.start()
    pipeline = Pipeline(cluster.urls, tmp_path, broker={"queue_type": "quorum"})
    yield pipeline
    pipeline.close()


class Scenario:
    """Uploads at a steady rate to a pipeline of one API and WORKERS workers
    while the test breaks the cluster; then the ledger's verdict."""

    def __init__(self, cluster, pipeline, name):
        self.cluster, self.pipeline, self.name = cluster, pipeline, name
        pipeline.start_api()
        for instance in range(1, WORKERS + 1):
            pipeline.start_worker(instance)
        self.ledger = Ledger.for_pipeline(pipeline, name)
        self.losses = 0
        self._stop = threading.Event()
        self._load = self.ledger.run_load(count=10 * MIN_JOBS, per_second=UPLOADS_PER_SECOND,
                                          stop=self._stop)
        self.wait_accepted(100)

    def wait_accepted(self, count, timeout=300):
        wait_until(lambda: len(self.ledger.accepted) >= count, f"{count} uploads accepted",
                   timeout, interval=0.2)

    def leader(self):
        return self.cluster.leader(self.pipeline.queue)

    def lost(self, event):
        """A node just went away: count it, and time how long until both
        workers consume again (asked of any node that answers)."""
        self.losses += 1
        went = time.monotonic()
        # A moment for the broker to notice the consumers it lost. Not an
        # event to wait for: if no worker was connected to the lost node,
        # the count never drops.
        time.sleep(1)
        while True:
            try:
                if self.pipeline.consumers() >= WORKERS:
                    break
            except Exception:  # noqa: BLE001 - no node answers for a moment
                pass
            assert time.monotonic() - went < 60, f"workers not back 60 s after {event}"
            time.sleep(0.2)
        RECOVERIES.append((self.name, event, round(time.monotonic() - went, 1)))
        return time.monotonic() - went

    def finish(self, min_jobs=MIN_JOBS, max_window=15):
        self.wait_accepted(min_jobs)
        self._stop.set()
        self._load.join()
        counters = self.ledger.check(settle_timeout=300)
        window = self.ledger.longest_refusal_window()
        RECOVERIES.append((self.name, "longest run of 503s", round(window, 1)))
        print(counters, f"longest refusal window {window:.1f} s")
        assert counters.accepted >= min_jobs
        assert counters.lost == 0 and counters.corrupt == 0 and counters.unexpected == 0, \
            counters.notes[:10]
        assert counters.failed == 0, counters.notes[:10]
        # A loss can hand the job in hand of each worker connected to the
        # lost node to another worker before the first one finished it.
        assert counters.duplicated <= self.losses * WORKERS, counters
        assert set(counters.refused) <= {503}    # refused = 503 + Retry-After, never a 5xx
        # 503 only while a quorum could not confirm
        assert window < max_window, window
        return counters


def test_stopping_the_job_queues_leader_mid_stream_and_starting_it_again(cluster,
                                                                        cluster_pipeline):
    scenario = Scenario(cluster, cluster_pipeline, "C1. stop the queue's leader, start it")
    leader = scenario.leader()
    leader.stop()
    assert scenario.lost(f"stop {leader.name}") < 30
    assert scenario.leader() is not leader, "a new leader was elected"
    scenario.wait_accepted(500)
    leader.start()
    scenario.finish()


def test_kill_9_of_a_nodes_beam_smp(cluster, cluster_pipeline):
    scenario = Scenario(cluster, cluster_pipeline, "C2. kill -9 the leader's beam.smp")
    leader = scenario.leader()
    leader.kill()
    assert scenario.lost(f"kill -9 {leader.name}") < 30
    scenario.wait_accepted(500)
    leader.start()
    scenario.finish()


def test_a_rolling_restart_of_all_three_nodes_while_uploads_arrive(cluster, cluster_pipeline):
    scenario = Scenario(cluster, cluster_pipeline, "C3. rolling restart of 3 nodes")
    for node in cluster.nodes:
        # as an operator would: only once no quorum queue depends on it
        cluster.wait_until_safe_to_stop(node)
        node.stop()
        assert scenario.lost(f"restart {node.name}") < 30
        node.start()
    scenario.finish()


def test_with_no_majority_uploads_get_503_within_the_timeout_and_202_once_one_is_back(
        cluster, cluster_pipeline):
    scenario = Scenario(cluster, cluster_pipeline, "C4. two of 3 nodes down, one back")
    leader = scenario.leader()
    followers = [node for node in cluster.nodes if node is not leader]
    for node in followers:
        node.stop()
    quorum_lost = time.monotonic()
    # The outage under test, not a wait: uploads go on arriving with no
    # majority, and every one of them must be refused in time
    time.sleep(10)
    followers[0].start()
    quorum_back = time.monotonic()
    refused = [(started, seconds, status) for started, seconds, status
               in scenario.ledger.responses if quorum_lost + 1 < started < quorum_back - 3]
    # the wait for a confirm no majority can give is bounded by [broker] timeout
    timeout = float(cluster_pipeline.values["broker"]["timeout"])
    assert refused and {status for _, _, status in refused} == {503}, refused
    assert max(seconds for _, seconds, _ in refused) < timeout + 2
    followers[1].start()
    scenario.losses += 2
    counters = scenario.finish(min_jobs=300, max_window=25)
    assert counters.refused[503] >= len(refused)
    assert scenario.ledger.responses[-1][2] == 202
