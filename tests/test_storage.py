"""Storage: how a new upload is stored, and the group sync that makes it
durable. (That a 202's files survive a crash is the fault suite's to show:
tests/faults.)"""

import errno
import json
import os
import threading
import time

import pytest

from harness import samples
from imgworker import config, ingest
from imgworker.job import Job
from imgworker.storage import GroupSync, Storage, StorageFull, new_job_id


def test_an_upload_is_stored_as_original_record_and_pending_mark_with_no_temp_file(tmp_path):
    storage = Storage(str(tmp_path))
    storage.prepare(marker=True)
    job_id, data = new_job_id(), samples.jpeg(64, 48)
    storage.store_upload(Job.accepted(job_id, "jpeg", 64, 48, len(data)), data)
    with open(storage.original_path(job_id), "rb") as handle:
        assert handle.read() == data
    with open(tmp_path / "jobs" / f"{job_id}.json") as handle:
        assert json.load(handle)["state"] == "queued"
    # the mark is the record's second name, not a file of its own
    assert os.path.samefile(tmp_path / "jobs" / f"{job_id}.json",
                            tmp_path / "jobs" / f"{job_id}.pending")
    assert storage.pending_jobs(-1) == [job_id]
    storage.clear_pending(job_id)
    assert sorted(os.listdir(tmp_path / "jobs")) == [f"{job_id}.json"]
    assert storage.read_job(job_id).state.value == "queued"


def test_a_full_disk_while_storing_an_upload_is_storage_full(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    storage.prepare()

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageFull):
        storage.store_upload(Job.accepted(new_job_id(), "jpeg", 1, 1, 1), b"x")


class CountingSync(GroupSync):
    """A GroupSync whose syncfs takes 20 ms, as a disk flush does, and is counted."""

    def __init__(self, path, fail=()):
        super().__init__(path)
        self.calls, self.fail = 0, list(fail)

    def _syncfs(self):
        self.calls += 1
        time.sleep(0.02)
        if self.fail and self.fail.pop(0):
            return OSError(errno.EIO, "syncfs: Input/output error")
        return super()._syncfs()


def test_threads_waiting_at_once_share_syncs(tmp_path):
    sync = CountingSync(str(tmp_path))
    finished = []

    def upload():
        sync.wait()
        finished.append(1)
    threads = [threading.Thread(target=upload) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(finished) == 32
    # one sync per waiter would be 32; a thread that arrives during a sync
    # waits for the next one, so a handful serve them all
    assert sync.calls <= 8


def test_a_failed_sync_fails_the_waiters_it_served_and_not_later_ones(tmp_path):
    sync = CountingSync(str(tmp_path), fail=[True])
    with pytest.raises(OSError, match="Input/output error"):
        sync.wait()
    sync.wait()                                  # the next sync succeeds
    assert sync.calls == 2


def test_the_sweep_drops_an_upload_whose_record_reached_the_disk_without_all_its_original(tmp_path):
    # Given what power lost during an upload's sync may leave: the record and
    # its pending mark, and only part of the original (no 202 was given)
    storage = Storage(str(tmp_path / "storage"))
    storage.prepare(marker=True)
    job_id, data = new_job_id(), samples.jpeg(64, 48)
    storage.store_upload(Job.accepted(job_id, "jpeg", 64, 48, len(data)), data)
    os.truncate(storage.original_path(job_id), len(data) // 2)
    ini = tmp_path / "config.ini"
    ini.write_text(f"[storage]\nroot = {storage.root}\n[broker]\nurl = amqp://nobody@127.0.0.1:9/\n")
    # When the sweep runs: it is removed, not queued (no broker is needed)
    assert ingest.recover(config.load(str(ini)), older_than=-1) == (0, 0, 1)
    assert storage.read_job(job_id) is None
    assert not os.path.exists(storage.original_path(job_id))
    assert storage.pending_jobs(-1) == []


def renditions_of(make_storage):
    """A storage, a job id, and that job's renditions as the renderer makes them."""
    storage = make_storage()
    job_id = new_job_id()
    renditions = config.from_dict({}).renditions
    return storage, job_id, [(rendition, rendition.name.encode() * 100) for rendition in renditions]


def test_staged_renditions_appear_under_their_names_only_once_committed(tmp_path):
    storage, job_id, outputs = renditions_of(lambda: Storage(str(tmp_path)))
    staged = storage.stage_renditions(job_id, outputs)
    directory = storage.rendition_dir(job_id)
    assert all(name.startswith(".tmp-") for name in os.listdir(directory))
    assert len(os.listdir(directory)) == len(outputs)
    storage.commit_renditions(job_id, staged)
    for rendition, data in outputs:
        path = storage.rendition_path(job_id, rendition)
        with open(path, "rb") as handle:
            assert handle.read() == data
        assert os.stat(path).st_mode & 0o777 == 0o644     # nginx (www-data) serves them
    assert len(os.listdir(directory)) == len(outputs)      # no temp file left


@pytest.mark.parametrize("errno_, raised", [(errno.ENOSPC, StorageFull), (errno.EIO, OSError)])
def test_a_failed_commit_leaves_no_staged_file_and_no_rendition(tmp_path, monkeypatch, errno_,
                                                               raised):
    storage, job_id, outputs = renditions_of(lambda: Storage(str(tmp_path)))
    staged = storage.stage_renditions(job_id, outputs)

    def failing_fsync(_fd):
        raise OSError(errno_, os.strerror(errno_))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(raised):
        storage.commit_renditions(job_id, staged)
    # after a failed fsync the data is not trusted: the job is rendered again
    assert os.listdir(storage.rendition_dir(job_id)) == []


def test_a_full_disk_while_staging_is_storage_full_and_leaves_no_temp_file(tmp_path, monkeypatch):
    storage, job_id, outputs = renditions_of(lambda: Storage(str(tmp_path)))
    real_write, writes = os.write, []

    def full_on_second_file(fd, data):     # each staged file is one write
        writes.append(fd)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full_on_second_file)
    with pytest.raises(StorageFull):
        storage.stage_renditions(job_id, outputs)
    assert os.listdir(storage.rendition_dir(job_id)) == []
