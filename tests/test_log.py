import logging
import os
import sys

import pytest

from imgworker import log


@pytest.fixture
def journal():
    """systemd.journal, from python3-systemd (script/bootstrap installs it).
    Without it the test skips on a laptop and FAILS under CI=true: a CI
    that lost the package must not go green."""
    try:
        from systemd import journal
    except ImportError as error:
        message = f"python3-systemd is not installed ({error}); script/bootstrap installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return journal


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_off_journald_lines_go_to_stderr_with_a_timestamp_and_the_job_id(tmp_path, monkeypatch,
                                                                        restore_root_logger):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = open(tmp_path / "stderr", "w+")
    monkeypatch.setattr(sys, "stderr", stream)
    log.setup(instance="3")
    log.JobLog(logging.getLogger("imgworker.worker"), "ab" * 16).info("done in %d ms.", 12)
    stream.flush()
    line = (tmp_path / "stderr").read_text()
    assert line.endswith(f"INFO imgworker@3 imgworker.worker: job {'ab' * 16}: done in 12 ms.\n")
    assert line[:4].isdigit()   # a timestamp leads


def test_under_journald_records_carry_job_and_instance_fields_and_no_timestamp(tmp_path, monkeypatch,
                                                                              journal,
                                                                              restore_root_logger):
    # systemd hands the service a stderr whose device:inode is in JOURNAL_STREAM
    stream = open(tmp_path / "stderr", "w")
    status = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    monkeypatch.setattr(sys, "stderr", stream)
    log.setup(instance="2")
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, journal.JournalHandler)
    sent = []
    handler.send = lambda MESSAGE, **fields: sent.append((MESSAGE, fields))
    log.JobLog(logging.getLogger("imgworker.worker"), "cd" * 16).warning("attempt %d failed.", 1)
    ((message, fields),) = sent
    assert message == f"job {'cd' * 16}: attempt 1 failed."
    assert fields["IMGWORKER_JOB_ID"] == "cd" * 16
    assert fields["IMGWORKER_INSTANCE"] == "2"
    assert fields["SYSLOG_IDENTIFIER"] == "imgworker"
    assert fields["PRIORITY"] == "4"


def test_a_journal_stream_that_is_not_our_stderr_is_not_trusted(tmp_path, monkeypatch,
                                                                restore_root_logger):
    # A child started from a unit inherits JOURNAL_STREAM but may log elsewhere.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    monkeypatch.setattr(sys, "stderr", open(tmp_path / "stderr", "w"))
    log.setup()
    (handler,) = logging.getLogger().handlers
    assert type(handler) is logging.StreamHandler
