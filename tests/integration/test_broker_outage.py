"""The broker goes away (rabbitmqctl stop_app) and comes back: the API
answers 503 quickly and never 202, the worker reconnects by itself. The
broker closes the API's connection: the API reconnects and keeps nothing of
the old one.

Needs rabbitmqctl for the broker the tests use, so it runs where that broker
runs (CI, a dev machine with RabbitMQ installed).
"""

import os
import shutil
import subprocess
import time

import pytest
import requests

from harness import samples
from harness.pipeline import children, wait_until


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def close_connections_named(name):
    """Have the broker close every connection whose client named itself
    ``name``, as it does on a missed heartbeat or an operator's command;
    how many it closed."""
    closed = 0
    for line in rabbitmqctl("-q", "list_connections", "pid", "client_properties").splitlines():
        if f'"{name}"' in line:
            rabbitmqctl("close_connection", line.split()[0], "closed by the test")
            closed += 1
    return closed


def sockets_of(pid):
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
               for fd in os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def broker_control(amqp_url):
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to stop and start the test broker")
    yield
    # Whatever the test did, leave the broker running for the next one.
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")


def test_while_the_broker_is_down_uploads_get_503_fast_and_workers_resume_after(pipeline,
                                                                               broker_control):
    # Given a running pipeline that has processed a job
    pipeline.start_api()
    worker = pipeline.start_worker()
    before = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    assert pipeline.wait_job(before)["state"] == "done"

    # When the broker stops
    rabbitmqctl("stop_app")

    # Then uploads are refused with 503 and Retry-After within a few seconds
    for _ in range(3):
        started = time.monotonic()
        response = pipeline.upload(samples.jpeg(400, 300))
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "4"
        assert "the job queue is unavailable" in response.json()["error"]
        assert elapsed < 5, f"503 took {elapsed:.1f} s"
    health = requests.get(pipeline.base_url + "/healthz", timeout=10)
    assert health.status_code == 503
    # And nothing of the refused uploads is kept (only the earlier job)
    assert pipeline.stored_originals() == [before]
    assert pipeline.stored_jobs() == [before + ".json"]

    # When the broker is back
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")

    # Then the very next upload is accepted (the API reconnects within the
    # request) and the same worker process, reconnected by itself, finishes it
    response = pipeline.upload(samples.jpeg(400, 300))
    assert response.status_code == 202, response.text
    job = pipeline.wait_job(response.json()["id"], timeout=60)
    assert job["state"] == "done"
    assert worker.process.poll() is None
    assert "Lost the broker" in worker.log()
    assert requests.get(pipeline.base_url + "/healthz", timeout=10).status_code == 200


def test_an_api_process_whose_broker_connection_is_closed_reconnects_and_keeps_no_old_socket(
        make_pipeline, broker_control):
    # Given an API process that has published an upload, and its sockets then
    pipeline = make_pipeline()
    api = pipeline.start_api()
    (process,) = children(api.process.pid)          # [api] workers = 1 in the harness
    assert pipeline.upload(samples.jpeg(64, 64)).status_code == 202
    before = sockets_of(process)        # perhaps with the upload's, closing
    # When the broker closes its connection three times, an upload after each
    for _ in range(3):
        assert close_connections_named(f"imgworker api pid {process}") == 1
        response = pipeline.upload(samples.jpeg(64, 64))
        # Then each upload is accepted on a new connection
        assert response.status_code == 202, response.text
    assert pipeline.queue_depth() == 4
    # ... and the process holds no more sockets than before: the old
    # connections' sockets and their I/O loops' socket pairs (3 a
    # connection) are gone
    wait_until(lambda: sockets_of(process) <= before,
               f"API process {process} to hold its {before} sockets again", timeout=10)
