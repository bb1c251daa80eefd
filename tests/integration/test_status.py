"""`imgworker status` against a real broker and storage, as an operator runs it."""

import json
import os
import subprocess
import sys

import requests

from harness import samples
from harness.pipeline import REPO


def status(pipeline, *args):
    return subprocess.run([sys.executable, "-m", "imgworker", "--config", pipeline.config_path,
                           "status", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_status_shows_queues_consumers_and_the_recent_jobs_by_outcome(pipeline):
    pipeline.start_api()
    pipeline.start_worker(1)
    pipeline.start_worker(2)
    good = [pipeline.upload(samples.jpeg(640, 480)).json()["id"] for _ in range(3)]
    bad = pipeline.upload(data=samples.truncated_jpeg(),
                          headers={"Content-Type": "image/jpeg"}).json()["id"]
    for job_id in good + [bad]:
        pipeline.wait_job(job_id)

    shown = status(pipeline, "--json")
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert found["queues"] == {pipeline.queue: {"messages": 0, "consumers": 2},
                               pipeline.dead_letter_queue: {"messages": 1, "consumers": 0}}
    assert found["jobs"] == {"done": 3, "failed": 1, "processing": 0, "queued": 0}
    assert found["workers"] is None            # no systemd on this machine (see tests/system)

    text = status(pipeline).stdout
    assert f"{pipeline.queue}: 0 messages, 2 consumers" in text
    assert "3 done, 1 failed" in text

    # what the storage holds, as the sweep measured it, and what was erased
    assert found["storage"]["filesystem"]["size"] > 0 and "at" not in found["storage"]
    pipeline.cli("erase", good[0])
    pipeline.cli("sweep")
    found = json.loads(status(pipeline, "--json").stdout)
    renditions = len(pipeline.renditions)
    assert {kind: found["storage"][kind]["files"] for kind in
            ("originals", "renditions", "records")} == {
        "originals": 3, "renditions": 2 * renditions, "records": 3}
    assert found["storage"]["originals"]["bytes"] == sum(
        os.path.getsize(os.path.join(pipeline.root, "originals", job_id))
        for job_id in pipeline.stored_originals())
    assert found["removed"] == {"erased": {"request": 1, "retention": 0},
                                "originals_removed": 0}
    text = status(pipeline).stdout
    assert "storage: originals 3 files" in text
    assert "removed since boot: 1 jobs erased on request" in text
    metrics = requests.get(pipeline.base_url + "/metrics", timeout=10).text
    assert 'imgworker_stored_files{kind="originals"} 3.0' in metrics
    assert 'imgworker_erased_total{reason="request"} 1.0' in metrics


def test_status_says_the_broker_is_unreachable_and_exits_1(make_pipeline):
    pipeline = make_pipeline(broker={"url": "amqp://guest:guest@127.0.0.1:1/%2F"})
    shown = status(pipeline)
    assert shown.returncode == 1
    assert "broker: unreachable: cannot connect to the broker" in shown.stdout
