"""Everything imgworker keeps on disk, below one root, written so that a
crash at any instant leaves either the old file or the new one, never half.

    ROOT/originals/<id>             the upload, as received
    ROOT/renditions/<id>/<name>.<ext>  the outputs; nginx serves this tree
    ROOT/jobs/<id>.json             the job's state, the only datastore

Paths are a pure function of the job id and rendition, so a redelivered job
overwrites its own files instead of adding new ones.
"""

import errno
import json
import os
import re
import tempfile
import time
import uuid

#: Job ids are generated here, never taken from a client: 32 hex digits.
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

STATES = ("queued", "processing", "done", "failed")


class StorageFull(Exception):
    """The storage root has no space (or inodes) left."""


def new_job_id():
    return uuid.uuid4().hex


def is_job_id(text):
    return bool(_JOB_ID.match(text))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, data):
    """Write bytes to path durably: temp file in the same directory, fsync,
    rename over path, fsync the directory so the rename itself survives."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.rename(temp, path)
    except BaseException as error:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"no space left below {directory}") from None
        raise
    _fsync_dir(directory)


class Storage:
    def __init__(self, root):
        self.root = root

    def original_path(self, job_id):
        return os.path.join(self.root, "originals", job_id)

    def rendition_dir(self, job_id):
        return os.path.join(self.root, "renditions", job_id)

    def rendition_path(self, job_id, rendition):
        return os.path.join(self.rendition_dir(job_id), f"{rendition.name}.{rendition.extension}")

    @staticmethod
    def rendition_url(job_id, rendition):
        return f"/renditions/{job_id}/{rendition.name}.{rendition.extension}"

    def _job_path(self, job_id):
        return os.path.join(self.root, "jobs", job_id + ".json")

    def prepare(self):
        """Create the directory tree (the API and workers both call this)."""
        for part in ("originals", "renditions", "jobs"):
            os.makedirs(os.path.join(self.root, part), exist_ok=True)

    # -- originals ---------------------------------------------------------
    def save_original(self, job_id, data):
        write_atomically(self.original_path(job_id), data)

    def read_original(self, job_id):
        with open(self.original_path(job_id), "rb") as handle:
            return handle.read()

    def write_rendition(self, job_id, rendition, data):
        write_atomically(self.rendition_path(job_id, rendition), data)

    # -- job state ---------------------------------------------------------
    def read_job(self, job_id):
        """The job's state as a dict, or None for an unknown id."""
        if not is_job_id(job_id):
            return None
        try:
            with open(self._job_path(job_id), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def write_job(self, job):
        assert job["state"] in STATES, job["state"]
        job["updated_at"] = time.time()
        data = json.dumps(job, sort_keys=True, indent=1).encode()
        write_atomically(self._job_path(job["id"]), data)

    def forget_job(self, job_id):
        """Remove an upload the broker never accepted (the client got 503)."""
        for path in (self._job_path(job_id), self.original_path(job_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
