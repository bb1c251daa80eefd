"""Erasure on the storage and in the job policy, without a broker: the
tombstone stops every later write of the job, the job's lock keeps a
writer in another process and an erasure apart, and a worker that meets an
erased job drops it. With a real broker, API and workers:
tests/integration/test_erasure.py."""

import multiprocessing
import os
import threading
import time

import pytest

from imgworker import config, images, storage as storage_module
from imgworker.erasure import Result
from imgworker.job import Job, State
from imgworker.policy import Decision, JobPolicy, Rendered
from imgworker.renderer import render_job
from imgworker.storage import Erased, LockTimeout, Storage, new_job_id
from harness import samples


@pytest.fixture
def world(tmp_path):
    settings = config.from_dict({"storage": {"root": str(tmp_path)},
                                 "worker": {"retry_delay": "0.01"}})
    storage = Storage(str(tmp_path))
    storage.prepare(marker=True)
    job = Job.accepted(new_job_id(), "jpeg", 800, 600, 1, owner="alice")
    storage.store_upload(job, samples.jpeg(800, 600))
    limits = images.Limits.from_config(settings)

    def policy():
        return JobPolicy(settings, "1", storage,
                         lambda job_id, progress: render_job(storage, job_id, settings.renditions,
                                                             limits, progress))
    return settings, storage, job.id, policy


def message(job_id):
    return ('{"id": "%s", "format": "jpeg"}' % job_id).encode()


def files_of(root, job_id):
    """Every path below root that names the job, its tombstone aside."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(directory, name)
            if job_id in path and os.path.dirname(path) != os.path.join(root, "tombstones"):
                found.append(os.path.relpath(path, root))
    return sorted(found)


def tombstone(storage, job_id):
    laid = storage.lay_tombstone(job_id, "request", timeout=5)
    if laid:
        storage.remove_job_files(job_id, laid["owner"], laid["ended"])
    return laid


def test_an_upload_is_indexed_under_its_owner_and_the_index_goes_with_the_job(world):
    _settings, storage, job_id, _policy = world
    assert storage.owner_jobs("alice") == [job_id]
    assert storage.owner_jobs("bob") == []
    assert tombstone(storage, job_id)
    assert not tombstone(storage, job_id)           # once
    assert storage.owner_jobs("alice") == []
    assert files_of(storage.root, job_id) == ["erasing/" + job_id]


def test_nothing_of_an_erased_job_is_written_again_and_staged_renditions_are_dropped(world):
    settings, storage, job_id, _policy = world
    staged = render_job(storage, job_id, settings.renditions,
                        images.Limits.from_config(settings), lambda: None)
    tombstone(storage, job_id)
    storage.finish_erasing(job_id)
    with pytest.raises(Erased):
        storage.write_job(Job.accepted(job_id, "jpeg", 1, 1, 1))
    with pytest.raises(Erased):
        storage.commit_renditions(job_id, staged.files)
    assert files_of(storage.root, job_id) == []


def test_a_worker_drops_an_erased_job_whether_erased_before_it_or_while_it_renders(world):
    _settings, storage, job_id, policy = world
    # erased while it renders: begin has staged the renditions
    begun = policy().begin(message(job_id))
    assert isinstance(begun, Rendered)
    tombstone(storage, job_id)
    outcome = policy().finish(begun)
    assert (outcome.decision, outcome.ended) == (Decision.ACK, None)
    storage.finish_erasing(job_id)
    assert files_of(storage.root, job_id) == []
    # and its redelivery is acknowledged with nothing written
    outcome = policy().handle(message(job_id), redelivered=True)
    assert (outcome.decision, outcome.ended) == (Decision.ACK, None)
    assert files_of(storage.root, job_id) == []


def _hold_lock(root, job_id, ready, release):
    with Storage(root)._locks.held(job_id):
        ready.set()
        release.wait(30)


def test_the_jobs_lock_keeps_an_erasure_and_a_writer_in_another_process_apart(world):
    _settings, storage, job_id, _policy = world
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(storage.root, job_id, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            storage.lay_tombstone(job_id, "request", timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert not storage.is_erased(job_id)
        # another job's lock is free meanwhile (one that is not there at all)
        with pytest.raises(LookupError):
            storage.lay_tombstone(new_job_id(), "request", timeout=0.3)
        release.set()
        holder.join(30)
        assert storage.lay_tombstone(job_id, "request", timeout=5)["owner"] == "alice"
    finally:
        release.set()
        holder.join(30)


def test_an_erasure_of_an_unknown_or_malformed_id_erases_nothing(world):
    settings, storage, _job_id, _policy = world
    from imgworker.erasure import Eraser
    with Eraser(settings, storage) as eraser:
        # nothing to announce, so no broker is needed
        results = eraser.erase([new_job_id(), "../../etc", "x" * 32])
    assert set(results.values()) == {Result.UNKNOWN}
    assert not os.listdir(os.path.join(storage.root, "tombstones"))


def test_a_record_written_before_an_erasure_is_removed_by_it(world):
    _settings, storage, job_id, _policy = world
    job = storage.read_job(job_id)
    job.start("1")
    storage.write_job(job)
    assert storage.read_job(job_id).state is State.PROCESSING
    tombstone(storage, job_id)
    assert storage.read_job(job_id) is None
    assert storage_module.is_job_id(job_id) and storage.is_erased(job_id)


def test_the_jobs_lock_keeps_two_threads_of_one_process_apart_and_leaves_nothing_open(world):
    _settings, storage, job_id, _policy = world
    import threading
    inside, release = threading.Event(), threading.Event()

    def hold():
        with storage._locks.held(job_id):
            inside.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        with pytest.raises(LockTimeout):
            with storage._locks.held(job_id, timeout=0.2):
                pass
    finally:
        release.set()
        holder.join(30)
    with storage._locks.held(job_id, timeout=1):
        pass
    # between holds no descriptor of the lock file stays open (an unmount
    # of the storage must not find it busy)
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert storage._locks.path not in held


def test_an_owners_erasure_that_finds_an_upload_being_stored_erases_all_of_it(tmp_path,
                                                                              monkeypatch):
    # Given an upload of owner bob being stored, paused just after its
    # owner index entry is written
    storage = Storage(str(tmp_path))
    storage.prepare(marker=True)
    job = Job.accepted(new_job_id(), "jpeg", 80, 60, 1, owner="bob")
    erasure = {}
    indexed, erasing = threading.Event(), threading.Event()
    index_owner = Storage._index_owner

    def index_then_let_the_erasure_in(self, owner, job_id):
        index_owner(self, owner, job_id)
        indexed.set()
        erasing.wait(2)         # the erasure has listed the entry and waits for the lock

    def erase_bob():
        indexed.wait(10)
        eraser = Storage(str(tmp_path))
        found = eraser.owner_jobs("bob")
        erasing.set()
        erasure["listed"] = found
        erasure["tombstone"] = tombstone(eraser, found[0]) if found else None
        for job_id in found:
            eraser.finish_erasing(job_id)
    monkeypatch.setattr(Storage, "_index_owner", index_then_let_the_erasure_in)
    thread = threading.Thread(target=erase_bob)
    thread.start()
    # When bob's erasure lists his jobs in the middle of it
    storage.store_upload(job, samples.jpeg(80, 60))
    thread.join(30)
    # Then the erasure found the job with its owner, and nothing of it is
    # left: not the record, not the index entry
    assert erasure["listed"] == [job.id]
    assert erasure["tombstone"]["owner"] == "bob"
    assert files_of(str(tmp_path), job.id) == []
    assert storage.read_job(job.id) is None and storage.owner_jobs("bob") == []
