"""Logging: structured records to journald under systemd, plain lines on
stderr everywhere else.

Under journald each record carries fields a person can filter on --
``journalctl IMGWORKER_JOB_ID=<id>``, ``IMGWORKER_INSTANCE=3`` -- and no
timestamp in the message, since the journal keeps its own.
"""

import logging
import os
import sys


def _stderr_is_journal():
    """True when systemd connected our stderr to journald (JOURNAL_STREAM
    names the device:inode of that stream, see systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        status = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def setup(instance=None, level=logging.INFO):
    """Configure the root logger once per process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = None
    if _stderr_is_journal():
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            fields = {"SYSLOG_IDENTIFIER": "imgworker"}
            if instance is not None:
                fields["IMGWORKER_INSTANCE"] = str(instance)
            handler = JournalHandler(**fields)
            handler.setFormatter(logging.Formatter("%(message)s"))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        where = "" if instance is None else f"@{instance}"
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s imgworker{where} %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # pika logs each connection failure several times over, with tracebacks;
    # every one also reaches our code as an exception, logged once, in a
    # sentence ("Lost the broker: ...").
    logging.getLogger("pika").setLevel(logging.CRITICAL)


class JobLog(logging.LoggerAdapter):
    """A logger for one job: the id leads every message, and under journald
    it is also the field IMGWORKER_JOB_ID."""

    def __init__(self, logger, job_id):
        super().__init__(logger, {"IMGWORKER_JOB_ID": job_id})
        self.job_id = job_id

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return f"job {self.job_id}: {msg}", kwargs
