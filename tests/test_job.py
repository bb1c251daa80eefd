import argparse
import enum
import importlib
import json
import os
import re

import pytest

from imgworker import cli, job as jobs, status
from imgworker.job import Job, State

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# -- a new state reaches every reader of the states -----------------------------

class _Grown(str, enum.Enum):
    """job.State with one more finished state, as a later version might add."""
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self):
        return self in (_Grown.DONE, _Grown.FAILED, _Grown.CANCELLED)


@pytest.fixture
def grown_states(monkeypatch):
    """job.State grown by a state, and the modules that read it loaded again."""
    monkeypatch.setattr(jobs, "State", _Grown)
    yield [importlib.reload(module) for module in (status, cli)]
    monkeypatch.undo()
    for module in (status, cli):
        importlib.reload(module)


def test_imgworker_status_counts_and_shows_every_state_the_job_module_has(grown_states, tmp_path):
    grown_status, _ = grown_states
    (tmp_path / "jobs").mkdir()
    for number, state in enumerate(_Grown):
        record = Job(f"{number:032x}", state, {"format": "jpeg", "width": 1, "height": 1,
                                                "bytes": 1}, updated_at=0)
        (tmp_path / "jobs" / f"{record.id}.json").write_bytes(record.to_json())

    counts = grown_status.recent_jobs(str(tmp_path), 5)

    assert counts == {state.value: 1 for state in _Grown}
    shown = grown_status.render({"queues": {}, "broker_error": None, "workers": [],
                                 "minutes": 5, "jobs": counts})
    assert shown[-1] == ("jobs changed in the last 5 minutes: "
                         "1 cancelled, 1 done, 1 failed, 1 processing, 1 queued")


def test_submit_wait_stops_at_every_state_the_job_module_calls_finished(grown_states, tmp_path,
                                                                         capsys, monkeypatch):
    _, grown_cli = grown_states
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff")
    answers = iter([(202, {"id": "0" * 32, "status_url": "/jobs/" + "0" * 32}),
                    (200, {"id": "0" * 32, "state": "processing"}),
                    (200, {"id": "0" * 32, "state": "cancelled"})])
    monkeypatch.setattr(grown_cli, "_request", lambda *args, **kwargs: next(answers))
    args = argparse.Namespace(url="http://127.0.0.1:1", file=str(photo), wait=True, timeout=30,
                              key=None)

    assert grown_cli.cmd_submit(args) == 1

    printed = capsys.readouterr()
    assert json.loads(printed.out.split("\n", 1)[1]) == {"id": "0" * 32, "state": "cancelled"}
    assert printed.err == ""


def test_no_script_reads_a_job_by_grepping_its_json_text():
    scripts = [os.path.join(folder, name) for folder in ("harness", "script", "tests/system")
               for name in sorted(os.listdir(os.path.join(REPO, folder)))
               if not name.endswith((".py", ".pyc")) and name != "__pycache__"]
    for script in scripts:
        with open(os.path.join(REPO, script), encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        # a job's key, or a state as a JSON string: grep '"state": "done"', *'"done"'*
        assert not re.search(r"""\\?"(state|attempts)\\?":|'"(%s)"'"""
                             % "|".join(state.value for state in State), text), \
            f"{script} greps a job's JSON text; parse it (harness/job_field.py)"
