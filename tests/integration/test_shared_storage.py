"""API and worker hosts share one storage root (NFS, CephFS, ...). These
machines have no NFS: a bind mount of the API's root stands in for the
shared filesystem, and an empty directory for the mountpoint before it is
mounted -- the classic failure: the mount missing at boot.

What must hold: a worker whose root is not the API's never takes a job for
a refused upload (it would acknowledge and drop it); it does not become
ready, says why, and starts work once the storage appears.
"""

import os
import subprocess

import pytest

from harness import samples


@pytest.fixture
def mountpoint(tmp_path):
    """An empty directory where the shared storage should be mounted; the
    fixture unmounts whatever the test mounted there."""
    path = tmp_path / "mnt" / "imgworker"
    path.mkdir(parents=True)
    yield str(path)
    subprocess.run(["umount", str(path)], capture_output=True)


def mount(source, target):
    subprocess.run(["mount", "--bind", source, target], check=True)


def umount(target):
    subprocess.run(["umount", target], check=True)


def worker_host(pipeline, mountpoint):
    """Start a worker configured like the API but with [storage] root = mountpoint."""
    with open(pipeline.config_path) as handle:
        text = handle.read()
    assert f"root = {pipeline.root}\n" in text
    path = os.path.join(pipeline.workdir, "worker-host.ini")
    with open(path, "w") as handle:
        handle.write(text.replace(f"root = {pipeline.root}\n", f"root = {mountpoint}\n"))
    return pipeline.start("worker-host", "worker", "--instance", "1", ready=False,
                          env={"IMGWORKER_CONFIG": path})


def test_a_worker_whose_storage_is_not_mounted_waits_unready_and_drops_no_job(pipeline,
                                                                              mountpoint):
    pipeline.start_api()
    job_id = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    worker = worker_host(pipeline, mountpoint)
    status = worker.wait_notification("STATUS=Waiting for the storage")
    assert mountpoint in status and "not mounted" in status
    worker.read_notifications(3)
    assert not any("READY=1" in m for m in worker.notifications)
    assert f"Not ready: {mountpoint} has no .imgworker-storage" in worker.log()
    # nothing was made on the local disk under the mountpoint, nothing taken
    assert os.listdir(mountpoint) == []
    assert pipeline.job(job_id)["state"] == "queued" and pipeline.queue_depth() == 1

    mount(pipeline.root, mountpoint)
    worker.wait_notification("READY=1")
    assert pipeline.wait_job(job_id)["state"] == "done"
    assert worker.process.poll() is None


def test_storage_unmounted_under_a_running_worker_is_waited_for_with_the_job_in_hand(
        pipeline, mountpoint):
    pipeline.start_api()
    mount(pipeline.root, mountpoint)
    worker = worker_host(pipeline, mountpoint)
    worker.wait_notification("READY=1")
    first = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    assert pipeline.wait_job(first)["state"] == "done"

    umount(mountpoint)
    second = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    worker.wait_notification("STATUS=Waiting for the storage")
    assert f"job {second}: waiting: {mountpoint} is not the API's storage" in worker.log()
    assert pipeline.job(second)["state"] == "queued"

    mount(pipeline.root, mountpoint)
    job = pipeline.wait_job(second)
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert "dropped" not in worker.log()
