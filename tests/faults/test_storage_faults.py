"""The storage root fills up: uploads are refused with a reason, nothing
half-written is ever served, and work resumes by itself when space returns."""

import errno
import os
import subprocess

import pytest
import requests

from harness.ledger import Ledger


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs to use as the storage root."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("mounting a small storage root needs root")
        pytest.skip("mounting a small storage root needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mountpoint)], check=True)
    yield str(mountpoint)
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(path):
    """Write a filler file until the filesystem has no space left."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            try:
                while True:
                    handle.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    return filler


def test_a_full_disk_refuses_uploads_with_507_pauses_workers_and_resumes_when_space_returns(
        make_pipeline, small_disk):
    pipeline = make_pipeline(storage={"root": small_disk})
    pipeline.start_api()
    ledger = Ledger.for_pipeline(pipeline, "10. storage root full")
    # Given jobs accepted while there was space, and no worker yet
    for _ in range(5):
        assert ledger.upload() == 202
    # When the disk fills up
    filler = fill(small_disk)
    # Then uploads get 507 with a reason, and nothing is kept of them
    response = requests.post(pipeline.base_url + "/upload", data=ledger.photo, timeout=10)
    assert response.status_code == 507
    assert response.json()["error"] == "the server's image storage is full; try again later"
    assert response.headers["Retry-After"] == "4"
    assert len(pipeline.stored_originals()) == 5
    # And a worker renders but waits for space, serving nothing half-written
    worker = pipeline.start_worker()
    worker.wait_log("waiting: no space left", timeout=30)
    for job_id in ledger.accepted:
        assert pipeline.read_job(job_id).state.value in ("queued", "processing")
        directory = os.path.join(small_disk, "renditions", job_id)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            # whatever a rename made visible is whole; temp files are never served
            served = requests.get(f"{pipeline.base_url}/renditions/{job_id}/{name}", timeout=10)
            if name.startswith(".tmp-"):
                assert served.status_code == 404
    assert worker.process.poll() is None
    # When space returns
    os.unlink(filler)
    counters = ledger.check(settle_timeout=60)
    # Then every accepted job finishes, on its first attempt
    assert (counters.done, counters.lost, counters.corrupt, counters.unexpected) == (5, 0, 0, 0)
    assert counters.duplicated == 0
    assert "storage has space again" in worker.log()
    assert ledger.upload() == 202
