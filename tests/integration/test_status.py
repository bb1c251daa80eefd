"""`imgworker status` against a real broker and storage, as an operator runs it."""

import json
import subprocess
import sys

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


def test_status_says_the_broker_is_unreachable_and_exits_1(make_pipeline):
    pipeline = make_pipeline(broker={"url": "amqp://guest:guest@127.0.0.1:1/%2F"})
    shown = status(pipeline)
    assert shown.returncode == 1
    assert "broker: unreachable: cannot connect to the broker" in shown.stdout
