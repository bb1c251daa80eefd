"""Retention: what ``imgworker gc`` (imgworker-gc.timer) removes once the
periods of ``[retention]`` have passed since a job ended.

    originals   a finished job's original goes; a done job stays done, its
                record saying when the original was removed
    renditions  a done job is erased (erasure.py, reason "retention")
    failed      a failed job is erased

Jobs are found from the ended index, ROOT/ended/<hour>/<id>, written when a
job's record first says it ended. For each period, ROOT/gc.json keeps the
first hour not yet read through: a run reads the hours from there up to the
one the period's cutoff falls in, so its cost follows what has expired
since the last run, not what is stored. The cutoff's own hour is read
again next time, job by job, so nothing is removed before its time and
nothing stays more than a run past it.
"""

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field

from . import metrics
from .erasure import Eraser
from .job import State
from .log import JobLog
from .storage import Storage, write_atomically

logger = logging.getLogger(__name__)

KINDS = ("originals", "renditions", "failed")


@dataclass
class Collected:
    """What one run removed."""
    originals: int = 0          # originals removed, their jobs kept
    erased: int = 0             # jobs erased (renditions or failed)
    read: int = 0               # index entries read
    hours: dict = field(default_factory=dict)   # kind -> hours read


def collect(config, now=None, storage=None):
    """One gc run at ``now`` (Unix time; default the clock's). Returns a
    Collected. Raises broker.BrokerUnavailable when jobs were erased but
    their job.deleted could not be announced (the sweep finishes those)."""
    storage = storage or Storage(config.storage.root)
    now = time.time() if now is None else now
    with _one_run(storage) as progress:
        collected = Collected()
        hours = storage.ended_hours()
        to_erase = {}
        for kind in KINDS:
            period = getattr(config.retention, kind)
            if period is None:
                continue
            cutoff = now - period
            last = int(cutoff // storage.HOUR)
            first = progress.get(kind, 0)
            read = [hour for hour in hours if first <= hour <= last]
            collected.hours[kind] = len(read)
            for hour in read:
                for job_id in storage.ended_in(hour):
                    collected.read += 1
                    _apply(storage, kind, job_id, hour, cutoff, now, collected, to_erase)
            # hours wholly before the cutoff are done with, for this period
            progress[kind] = max(first, last)
        if to_erase:
            with Eraser(config, storage) as eraser:
                results = eraser.erase(sorted(to_erase), reason="retention")
            collected.erased = sum(result.value == "erased" for result in results.values())
    return collected


def _apply(storage, kind, job_id, hour, cutoff, now, collected, to_erase):
    job = storage.read_job(job_id)
    if job is None or job.ended is None or int(job.ended // storage.HOUR) != hour:
        # erased; or replayed, and in another hour once it ends again
        storage.forget_ended(job_id, hour)
        return
    if job.ended > cutoff:
        return
    log = JobLog(logger, job_id)
    if kind == "originals":
        if "removed" not in job.original and storage.remove_original(job_id, job.ended, now):
            collected.originals += 1
            metrics.count_original_removed()
            log.info("original removed: [retention] originals has passed since the job ended.")
    elif (kind == "renditions" and job.state is State.DONE) or \
            (kind == "failed" and job.state is State.FAILED):
        to_erase[job_id] = kind


class _one_run:
    """ROOT/gc.json, read and written under an exclusive lock of the
    ended index's directory: two runs at once (the timer, and a person)
    take turns."""

    def __init__(self, storage):
        self.path = os.path.join(storage.root, "gc.json")
        self.directory = os.path.join(storage.root, "ended")

    def __enter__(self):
        os.makedirs(self.directory, 0o700, exist_ok=True)
        self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            with open(self.path, encoding="utf-8") as handle:
                self.progress = json.load(handle)
        except FileNotFoundError:
            self.progress = {}
        except ValueError:
            logger.warning("%s is not JSON: gc reads the whole ended index once.", self.path)
            self.progress = {}
        return self.progress

    def __exit__(self, kind, _error, _traceback):
        try:
            if kind is None:
                write_atomically(self.path, json.dumps(self.progress).encode())
        finally:
            os.close(self.fd)
