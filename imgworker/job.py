"""A job's record, ``ROOT/jobs/<id>.json``: its fields, its states and the
moves between them, in one place.

                 start            finish
    queued ───────────────► processing ──────► done
      ▲  │                    │   │ ▲
      │  │ fail      requeue  │   │ └─ start (redelivered after a crash)
      │  └──────► failed ◄────┘   │
      └───────────────────────────┘ requeue (a transient error: retried)
      ▲
      └─ replay, from failed: a person's decision (``imgworker dlq replay``)

The API writes a record ``queued``; a worker moves it on. ``done`` and
``failed`` are final for the workers: a redelivery of a finished job is only
acknowledged. Only a person moves a failed job on, by replaying it.

Standard library only, so the tools that read records inside the booted
test containers (the fault ledger, the poison-job killer) use it too.
"""

import enum
import json
import os
import time
from dataclasses import dataclass, fields


class State(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self):
        return self in (State.DONE, State.FAILED)


#: state -> the states a record may move to from it
_MOVES = {
    State.QUEUED: {State.PROCESSING, State.FAILED},
    State.PROCESSING: {State.PROCESSING, State.DONE, State.FAILED, State.QUEUED},
    State.DONE: set(),
    State.FAILED: set(),        # but a person may replay it: Job.replay
}


def record_path(root, job_id):
    return os.path.join(root, "jobs", job_id + ".json")


@dataclass
class Job:
    id: str
    state: State
    #: {"format", "width", "height", "bytes"} of the upload
    original: dict
    attempts: int = 0
    #: {name: {"url", "width", "height", "format", "bytes"}}, once done
    renditions: dict = None
    #: why it failed, once failed
    error: str = None
    #: why the last attempt did not finish, while it is retried
    last_error: str = None
    worker: str = None
    #: who uploaded it: the opaque id of the app's user its grant names (or
    #: the ?owner= of an upload made with a key). Erasure goes by it; events
    #: carry it to the app; GET /jobs/<id> never shows it.
    owner: str = None
    started_at: float = None
    #: when it ended (done or failed): retention counts from here
    ended_at: float = None
    seconds: float = None
    updated_at: float = None

    @classmethod
    def accepted(cls, job_id, fmt, width, height, size, owner=None):
        return cls(job_id, State.QUEUED,
                   {"format": fmt, "width": width, "height": height, "bytes": size},
                   owner=owner, updated_at=time.time())

    @classmethod
    def from_json(cls, data):
        values = json.loads(data)
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        values["state"] = State(values["state"])
        return cls(**values)

    def to_json(self):
        """The file's bytes: unset fields are left out, keys sorted."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if getattr(self, f.name) is not None}
        values["state"] = self.state.value
        # No indent: json's C encoder does not indent, and the pure-Python
        # one it falls back to was a tenth of the API's CPU per upload.
        return json.dumps(values, sort_keys=True).encode()

    def _move(self, state):
        if state not in _MOVES[self.state]:
            raise ValueError(f"job {self.id}: no move from {self.state.value} to {state.value}")
        self.state = state
        self.updated_at = time.time()

    # -- the moves ----------------------------------------------------------
    def start(self, worker):
        """A worker takes it: one more attempt, counted before any work."""
        self._move(State.PROCESSING)
        self.attempts += 1
        self.worker, self.started_at = worker, time.time()

    def finish(self, renditions, seconds):
        self._move(State.DONE)
        self.renditions, self.seconds, self.error = renditions, seconds, None
        self.ended_at = self.updated_at

    def fail(self, reason):
        self._move(State.FAILED)
        self.error = reason
        self.ended_at = self.updated_at

    @property
    def ended(self):
        """When it ended, or None; a record from before ended_at has its
        last change."""
        if not self.state.finished:
            return None
        return self.ended_at if self.ended_at is not None else self.updated_at

    def original_removed(self, when):
        """Retention took the original away; the renditions stay."""
        self.original = {**self.original, "removed": when}
        self.updated_at = time.time()

    def requeue(self, reason):
        self._move(State.QUEUED)
        self.last_error = reason

    def replay(self):
        """A failed job queued again by a person: its attempts start over;
        why it failed is kept as the last error. Not a move a worker makes."""
        if self.state is not State.FAILED:
            raise ValueError(f"job {self.id}: only a failed job is replayed, not a "
                             f"{self.state.value} one")
        self.state, self.updated_at = State.QUEUED, time.time()
        self.attempts, self.last_error, self.error = 0, self.error, None
        self.ended_at = None

    def event(self):
        """The body of the event that says it ended: what GET /jobs/<id>
        shows, and its owner, for the app that gave it."""
        shown = self.view()
        if self.owner is not None:
            shown["owner"] = self.owner
        return shown

    def view(self):
        """What GET /jobs/<id> answers: never the owner (anyone with the id
        may ask)."""
        shown = {"id": self.id, "state": self.state.value, "attempts": self.attempts,
                 "original": self.original}
        if self.updated_at is not None:
            shown["updated_at"] = self.updated_at
        if self.state is State.DONE:
            shown["renditions"] = self.renditions
        if self.state is State.FAILED:
            shown["error"] = self.error
        return shown


def read(root, job_id):
    """The record of job_id below root, or None if there is none."""
    try:
        with open(record_path(root, job_id), "rb") as handle:
            return Job.from_json(handle.read())
    except FileNotFoundError:
        return None
