import json

import pytest

from imgworker import job as jobs
from imgworker.job import Job, State


def test_a_record_round_trips_through_its_file_and_leaves_unset_fields_out(tmp_path):
    (tmp_path / "jobs").mkdir()
    record = Job.accepted("a" * 32, "jpeg", 640, 480, 1234)
    (tmp_path / "jobs" / ("a" * 32 + ".json")).write_bytes(record.to_json())
    assert jobs.read(str(tmp_path), "a" * 32) == record
    assert set(json.loads(record.to_json())) == {"id", "state", "attempts", "original", "updated_at"}
    assert jobs.read(str(tmp_path), "b" * 32) is None


def test_a_job_moves_queued_processing_done_counting_each_attempt():
    record = Job.accepted("a" * 32, "png", 1, 1, 1)
    record.start("1")
    record.requeue("the broker went away")
    record.start("2")
    record.finish({"thumb": {"url": "/renditions/x"}}, 0.1)
    assert (record.state, record.attempts, record.worker, record.last_error) == \
        (State.DONE, 2, "2", "the broker went away")
    assert record.view()["renditions"] == {"thumb": {"url": "/renditions/x"}}
    assert "error" not in record.view()


@pytest.mark.parametrize("moves", [["finish"], ["start", "finish", "start"], ["fail", "requeue"]])
def test_a_finished_job_never_moves_again_and_a_queued_one_cannot_be_done(moves):
    record = Job.accepted("a" * 32, "png", 1, 1, 1)
    calls = {"start": lambda: record.start("1"), "finish": lambda: record.finish({}, 0.1),
             "fail": lambda: record.fail("why"), "requeue": lambda: record.requeue("why")}
    with pytest.raises(ValueError, match="no move from"):
        for move in moves:
            calls[move]()


def test_only_a_failed_job_is_replayed_and_its_attempts_start_over():
    record = Job.accepted("a" * 32, "png", 1, 1, 1)
    with pytest.raises(ValueError, match="only a failed job"):
        record.replay()
    record.start("1")
    record.fail("the image cannot be processed: truncated")
    record.replay()
    assert (record.state, record.attempts, record.error, record.last_error) == \
        (State.QUEUED, 0, None, "the image cannot be processed: truncated")
    record.start("2")
    assert record.attempts == 1
