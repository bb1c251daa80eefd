"""Queue types and the cluster: the same ingest and drain runs against

- one RabbitMQ node with a classic queue (the baseline: imgworker until now),
- the same node with a quorum queue,
- a three-node cluster on this machine (harness/cluster.py) with a quorum
  queue, the API and workers given all three URLs,

interleaved (setup after setup, repetition after repetition) so that drift
of the machine hits all three alike; and on the cluster, the failover
window: uploads arriving steadily while the job queue's leader is stopped,
then while one node is killed with SIGKILL.

All three nodes share this machine's 2 cores with nginx, the API and the
workers: the cluster's figures are a floor, not what three hosts give.
"""

import tempfile
import threading
import time

from harness.cluster import Cluster
from harness.ledger import Ledger
from harness.pipeline import Pipeline

from . import endtoend, ingest


def run(workdir, amqp_url, photo, smoke, log=print):
    repetitions = 1 if smoke else 3
    cluster = Cluster(tempfile.mkdtemp(prefix="imgworker-bench-cluster-", dir="/var/tmp"))
    log("  starting a 3-node RabbitMQ cluster")
    cluster.start()
    try:
        setups = {"one node, classic queue (baseline)": (amqp_url, {"queue_type": "classic"}),
                  "one node, quorum queue": (amqp_url, {"queue_type": "quorum"}),
                  "3-node cluster, quorum queue": (cluster.urls, {"queue_type": "quorum"})}
        raw_path, _, _ = ingest.write_bodies(workdir, photo)
        results = {name: {"ingest": [], "drain": []} for name in setups}
        for repetition in range(repetitions + (0 if smoke else 1)):   # the first: warm-up
            for name, (url, broker) in setups.items():
                accepted = ingest.measure(workdir, url, name, "imgworker", raw_path, "image/jpeg",
                                          4 if smoke else 32, 1 if smoke else 5, broker=broker)
                drained = endtoend.drain(workdir, url, photo, 4 if smoke else 200, 2,
                                         broker=broker)
                if repetition == 0 and not smoke:
                    continue
                results[name]["ingest"].append(accepted)
                results[name]["drain"].append(drained)
                log(f"  {name}: ingest {accepted.accepted_per_second:.0f}/s "
                    f"(p99 {accepted.p99_ms:.0f} ms), 2 workers drain {drained:.1f} jobs/s")
        failover = {}
        for fault in ("stop", "kill -9"):
            failover[fault] = _failover(workdir, cluster, fault, smoke)
            log(f"  failover, {fault} of the leader: {failover[fault]}")
        return {"setups": results, "failover": failover}
    finally:
        cluster.stop()


def _failover(workdir, cluster, fault, smoke):
    """Uploads at 25/s with two workers; the job queue's leader is lost
    after 5 s. Returns the longest any upload took from the loss on, how
    many were refused, and when both workers consumed again."""
    for node in cluster.nodes:
        if not node.is_running():
            node.start()
    run_dir = tempfile.mkdtemp(prefix="failover-", dir=workdir)
    pipeline = Pipeline(cluster.urls, run_dir, broker={"queue_type": "quorum"})
    try:
        pipeline.start_api()
        pipeline.start_worker(1)
        pipeline.start_worker(2)
        ledger = Ledger.for_pipeline(pipeline, f"failover: {fault}")
        stop = threading.Event()
        load = ledger.run_load(count=100_000, per_second=25, stop=stop)
        time.sleep(2 if smoke else 5)
        leader = cluster.leader(pipeline.queue)
        lost = time.monotonic()
        leader.stop() if fault == "stop" else leader.kill()
        consumers_back = None
        while time.monotonic() - lost < 60:
            try:
                if pipeline.consumers() >= 2 and time.monotonic() - lost > 1:
                    consumers_back = time.monotonic() - lost
                    break
            except Exception:  # noqa: BLE001 - no node answers for a moment
                pass
            time.sleep(0.1)
        time.sleep(3 if smoke else 10)
        stop.set()
        load.join()
        leader.start()
        counters = ledger.check(settle_timeout=120)
        after = [(seconds, status) for started, seconds, status in ledger.responses
                 if started + seconds >= lost]
        return {"longest upload after the loss (s)": round(max(s for s, _ in after), 2),
                "uploads answered after the loss": len(after),
                "refused": sum(1 for _, status in after if status != 202),
                "longest run of refusals (s)": round(ledger.longest_refusal_window(), 2),
                "workers consuming again after (s)":
                    None if consumers_back is None else round(consumers_back, 1),
                "lost": counters.lost}
    finally:
        pipeline.close()
