"""The job policy on its own: no RabbitMQ, no renderer process. A real
storage tree in tmp_path; rendering is the renderer child's render_job in
this process, or a stand-in that raises what the renderer would."""

import errno
import json
import os

import pytest

from imgworker import config, images
from imgworker.job import Job, State
from imgworker.policy import Decision, JobPolicy, Rendered
from imgworker.renderer import RendererDied, RenderTimeout, render_job
from imgworker.storage import Storage, StorageFull, new_job_id
from harness import samples


@pytest.fixture
def world(tmp_path):
    """A storage tree with one accepted job, and a policy to make over it."""
    settings = config.from_dict({"storage": {"root": str(tmp_path)},
                                 "worker": {"retry_delay": "0.01", "max_attempts": "3"}})
    storage = Storage(str(tmp_path))
    storage.prepare(marker=True)     # as the API leaves it
    job_id = new_job_id()
    storage.save_original(job_id, samples.jpeg(800, 600))
    storage.write_job(Job.accepted(job_id, "jpeg", 800, 600, 1))
    limits = images.Limits.from_config(settings)

    def render(job_id, progress):
        return render_job(storage, job_id, settings.renditions, limits, progress)

    def make(render=render, stopping=lambda: False, storage=storage):
        return JobPolicy(settings, "7", storage, render, stopping=stopping)
    make.render = render        # what the renderer child would do, in this process
    return make, storage, job_id


def message(job_id):
    return json.dumps({"id": job_id, "format": "jpeg"}).encode()


def raising(error):
    def render(_job_id, _progress):
        raise error
    return render


def rendition_files(storage, job_id):
    """The file names in the job's renditions directory, temp files too."""
    return sorted(os.listdir(storage.rendition_dir(job_id)))


def test_a_good_job_ends_done_with_its_renditions_on_disk_and_is_acked(world):
    make, storage, job_id = world
    policy = make()
    assert policy.handle(message(job_id)).decision is Decision.ACK
    job = storage.read_job(job_id)
    assert (job.state, job.attempts, job.worker) == (State.DONE, 1, "7")
    assert sorted(job.renditions) == ["large", "medium", "thumb"]
    for rendition in job.renditions.values():
        assert os.path.getsize(os.path.join(storage.root, rendition["url"].lstrip("/"))) \
            == rendition["bytes"]
    assert (policy.jobs_done, policy.silence()) == (1, None)


@pytest.mark.parametrize("error, decision, state, reason", [
    # undecodable or over a limit: failed for good at once
    (images.BadImage("the jpeg data cannot be decoded"), Decision.DEAD_LETTER, State.FAILED,
     "error: the image cannot be processed: the jpeg data cannot be decoded"),
    # over job_timeout: the same input would be again
    (RenderTimeout("rendering took longer than 1 s"), Decision.DEAD_LETTER, State.FAILED,
     "error: rendering took longer than 1 s"),
    # anything else is transient: handed back, its reason kept
    (RendererDied("the renderer process died (signal SIGKILL)"), Decision.REQUEUE, State.QUEUED,
     "last_error: the renderer process died (signal SIGKILL)"),
])
def test_a_failed_render_is_failed_for_good_or_retried_by_its_kind(world, error, decision, state,
                                                                    reason):
    make, storage, job_id = world
    assert make(raising(error)).handle(message(job_id)).decision is decision
    job = storage.read_job(job_id)
    field, text = reason.split(": ", 1)
    assert (job.state, job.attempts, getattr(job, field)) == (state, 1, text)


def test_the_last_allowed_attempt_failing_fails_the_job_with_every_reason(world):
    make, storage, job_id = world
    policy = make(raising(RendererDied("the renderer process died")))
    decisions = [policy.handle(message(job_id)).decision for _ in range(3)]
    assert decisions == [Decision.REQUEUE, Decision.REQUEUE, Decision.DEAD_LETTER]
    job = storage.read_job(job_id)
    assert (job.state, job.attempts) == (State.FAILED, 3)
    assert job.error == "gave up after 3 attempts: the renderer process died"


def test_a_job_whose_attempts_are_used_up_by_crashes_fails_without_rendering(world):
    # Given a record that says three attempts started and none ended (each
    # killed its worker)
    make, storage, job_id = world
    job = storage.read_job(job_id)
    for _ in range(3):
        job.start("1")
    storage.write_job(job)
    # When it is delivered once more, nothing is rendered
    outcome = make(raising(AssertionError("must not render"))).handle(message(job_id), True)
    decision = outcome.decision
    assert decision is Decision.DEAD_LETTER
    assert storage.read_job(job_id).error == ("gave up after 3 attempts; the last one ended "
                                              "without a result (did the worker crash?)")


@pytest.mark.parametrize("state, decision", [(State.DONE, Decision.ACK),
                                             (State.FAILED, Decision.DEAD_LETTER)])
def test_a_finished_job_redelivered_is_settled_as_it_ended_without_rendering(world, state, decision):
    make, storage, job_id = world
    job = storage.read_job(job_id)
    job.start("1")
    job.finish({}, 0.1) if state is State.DONE else job.fail("earlier")
    storage.write_job(job)
    outcome = make(raising(AssertionError("must not render"))).handle(message(job_id), True)
    assert (outcome.decision, outcome.ended.state) == (decision, state)
    assert storage.read_job(job_id).attempts == 1


def full_once(render):
    """A render whose first staging of the renditions finds the disk full."""
    calls = []

    def once(job_id, progress):
        calls.append(job_id)
        if len(calls) == 1:
            raise StorageFull("no space left below the test root")
        return render(job_id, progress)
    return once


def test_a_full_disk_while_staging_is_waited_out_with_the_attempt_untouched(world):
    make, storage, job_id = world
    policy = make(full_once(make.render))
    assert policy.handle(message(job_id)).decision is Decision.ACK
    job = storage.read_job(job_id)
    assert (job.state, job.attempts) == (State.DONE, 1)
    assert rendition_files(storage, job_id) == ["large.jpg", "medium.jpg", "thumb.jpg"]


def test_a_full_disk_while_staging_and_stopping_hands_the_job_back(world):
    make, storage, job_id = world
    policy = make(full_once(make.render), stopping=lambda: True)
    assert policy.handle(message(job_id)).decision is Decision.REQUEUE
    assert storage.read_job(job_id).state is State.PROCESSING


class _CommitFailsOnce(Storage):
    """Storage whose first commit of staged renditions fails with ``error``,
    removing the staged files as commit() does."""

    def __init__(self, root, error):
        super().__init__(root)
        self.error = error

    def commit_renditions(self, job_id, staged):
        if self.error is not None:
            error, self.error = self.error, None
            for temp in staged.values():
                os.unlink(temp)
            raise error
        super().commit_renditions(job_id, staged)


def test_a_full_disk_while_committing_hands_the_job_back_to_render_again_as_it_was(world):
    make, storage, job_id = world
    # the disk full when the renditions are fsynced (as NFS reports it)
    policy = make(storage=_CommitFailsOnce(storage.root, StorageFull("no space left")))
    outcome = policy.handle(message(job_id))
    # handed back with its record as before the attempt, and nothing left
    assert (outcome.decision, outcome.counted) == (Decision.REQUEUE, None)
    job = storage.read_job(job_id)
    assert (job.state, job.attempts) == (State.QUEUED, 0)
    assert rendition_files(storage, job_id) == []
    # the redelivery renders it again, as its first attempt
    assert policy.handle(message(job_id)).decision is Decision.ACK
    job = storage.read_job(job_id)
    assert (job.state, job.attempts) == (State.DONE, 1)
    assert rendition_files(storage, job_id) == ["large.jpg", "medium.jpg", "thumb.jpg"]


def test_an_unknown_job_is_acked_and_a_non_job_dead_lettered(world):
    make, _storage, _job_id = world
    policy = make(raising(AssertionError("must not render")))
    assert policy.handle(message(new_job_id())).decision is Decision.ACK
    for body in (b"null", b'{"id": 1}', b"[]", b"\xff"):
        assert policy.handle(body).decision is Decision.DEAD_LETTER


def test_a_root_that_lost_the_apis_marker_is_waited_out_not_taken_for_a_refused_upload(
        world, tmp_path_factory):
    # The shared storage unmounted under a running worker: its root is an
    # empty directory and the job's record is out of sight. On the policy's
    # third look the storage is "mounted" again: the root becomes a symlink
    # to the real tree.
    make, storage, job_id = world
    mountpoint = str(tmp_path_factory.mktemp("mnt") / "imgworker")
    os.makedirs(mountpoint)
    looks = []

    def mount_on_third_look():
        looks.append(1)
        if len(looks) == 3:
            os.rmdir(mountpoint)
            os.symlink(storage.root, mountpoint)
        return False
    policy = make(storage=Storage(mountpoint), stopping=mount_on_third_look)
    assert policy.handle(message(job_id)).decision is Decision.ACK
    job = storage.read_job(job_id)
    assert (job.state, job.attempts) == (State.DONE, 1)
    assert len(looks) >= 3


def test_a_root_without_the_apis_marker_while_stopping_hands_the_job_back(world):
    make, storage, job_id = world
    elsewhere = Storage(os.path.join(storage.root, "unmounted"))
    os.makedirs(elsewhere.root)
    policy = make(raising(AssertionError("must not render")), storage=elsewhere,
                  stopping=lambda: True)
    assert policy.handle(message(job_id)).decision is Decision.REQUEUE
    assert (storage.read_job(job_id).state, storage.read_job(job_id).attempts) == (State.QUEUED, 0)


def test_a_rendered_job_is_on_disk_and_acked_only_once_finished_while_the_next_one_begins(world):
    # The worker's two threads: job A rendered (begin), job B begun before
    # A's files are written (finish)
    make, storage, job_a = world
    job_b = new_job_id()
    storage.save_original(job_b, samples.jpeg(640, 480))
    storage.write_job(Job.accepted(job_b, "jpeg", 640, 480, 1))
    policy = make()
    rendered_a = policy.begin(message(job_a))
    assert isinstance(rendered_a, Rendered)
    # staged: written, but under temp names nginx does not serve
    staged = rendition_files(storage, job_a)
    assert len(staged) == 3 and all(name.startswith(".tmp-") for name in staged)
    assert (storage.read_job(job_a).state, storage.read_job(job_a).attempts) == (State.PROCESSING, 1)

    rendered_b = policy.begin(message(job_b))
    assert storage.read_job(job_b).state is State.PROCESSING
    outcome_a = policy.finish(rendered_a)
    assert (outcome_a.decision, outcome_a.counted) == (Decision.ACK, "done")
    assert outcome_a.ended.state is State.DONE
    assert rendition_files(storage, job_a) == ["large.jpg", "medium.jpg", "thumb.jpg"]
    assert storage.read_job(job_a).state is State.DONE
    assert storage.read_job(job_b).state is State.PROCESSING

    assert policy.finish(rendered_b).decision is Decision.ACK
    assert storage.read_job(job_b).renditions["thumb"]["width"] <= 640
    assert policy.jobs_done == 2


def test_a_failed_rendition_write_hands_the_job_back_and_the_next_attempt_does_it(world):
    make, storage, job_id = world
    # an fsync of the renditions that found a writeback error
    policy = make(storage=_CommitFailsOnce(storage.root, OSError(errno.EIO, "Input/output error")))
    outcome = policy.handle(message(job_id))
    assert (outcome.decision, outcome.counted) == (Decision.REQUEUE, "retried")
    job = storage.read_job(job_id)
    assert (job.state, job.attempts, job.last_error) == (State.QUEUED, 1, "[Errno 5] Input/output error")
    assert rendition_files(storage, job_id) == []
    assert policy.handle(message(job_id)).decision is Decision.ACK
    job = storage.read_job(job_id)
    assert (job.state, job.attempts, sorted(job.renditions)) == (State.DONE, 2,
                                                                 ["large", "medium", "thumb"])
