"""Everything imgworker keeps on disk, below one root, written so that a
crash at any instant leaves either the old file or the new one, never half.

    ROOT/originals/<id>             the upload, as received
    ROOT/renditions/<id>/<name>.<ext>  the outputs; nginx serves this tree
    ROOT/jobs/<id>.json             the job's record (job.py), the only datastore
    ROOT/jobs/<id>.pending          upload stored, broker not yet confirmed
    ROOT/grants/<nonce>             an upload grant spent (auth.py)
    ROOT/owners/<owner hash>/<id>   the owner's jobs, for erasure by owner
    ROOT/tombstones/<id>            the job was erased: nothing of it is
                                    ever written again (erasure.py)
    ROOT/erasing/<id>               an erasure not yet finished (the sweep
                                    finishes it)
    ROOT/ended/<hour>/<id>          jobs by the hour they ended in, for gc
    ROOT/gc.json                    how far gc has read the ended index
    ROOT/.locks                     one lock per job (a byte range), held
                                    around every write of the job once
                                    uploaded, and around its tombstone
    ROOT/.imgworker-storage         "this is the storage the API writes to"

Paths are a pure function of the job id and rendition, so a redelivered job
overwrites its own files instead of adding new ones.
"""

import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import socket
import re
import struct
import tempfile
import threading
import time
import uuid

from . import job as jobs

#: Job ids are generated here, never taken from a client: 32 hex digits.
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class StorageFull(Exception):
    """The storage root has no space (or inodes) left."""


class Erased(Exception):
    """The job was erased: nothing of it may be written again."""


class LockTimeout(Exception):
    """A job's lock was held by another process for longer than asked."""


def owner_key(owner):
    """The owner index's directory name for an owner: any string, as a
    fixed-length name that says nothing of it."""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]


class _JobLocks:
    """Open-file-description (OFD) byte-range locks on one file,
    ROOT/.locks: the byte at an offset taken from the job id is that job's
    lock. They hold across the processes of a host and across the hosts of
    a shared filesystem that has locks (NFSv4, CephFS), with no file per
    job. An OFD lock belongs to the descriptor that took it, not to the
    process: two threads of one process exclude each other too, and closing
    the descriptor (each hold opens its own) gives back that lock alone.
    Nothing stays open between holds, so the storage can be unmounted under
    a waiting worker."""

    def __init__(self, root):
        self.path = os.path.join(root, ".locks")

    @contextlib.contextmanager
    def held(self, job_id, timeout=None):
        """The job's lock for the block; with ``timeout`` (seconds),
        LockTimeout if another holder keeps it that long."""
        request = _flock(fcntl.F_WRLCK, int(job_id[:15], 16))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if timeout is None:
                fcntl.fcntl(fd, _F_OFD_SETLKW, request)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.fcntl(fd, _F_OFD_SETLK, request)
                        break
                    except OSError as error:
                        if error.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise LockTimeout(f"job {job_id} is being written by another "
                                              "process") from None
                        time.sleep(0.01)
            yield
        finally:
            os.close(fd)                # gives the lock back


# Linux's fcntl commands for OFD locks (3.15+; Python names them from 3.9 on
# some platforms only) and its struct flock on 64-bit: l_type, l_whence,
# (pad), l_start, l_len, l_pid (0 for OFD locks), (pad).
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


def _flock(kind, offset):
    """A struct flock for one byte at ``offset``."""
    return struct.pack("=hh4xqqi4x", kind, os.SEEK_SET, offset, 1, 0)


def new_job_id():
    return uuid.uuid4().hex


def is_job_id(text):
    # fullmatch: "$" would also accept a trailing newline.
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Who may read what: originals and job records are the uploader's data
#: (GPS included), for imgworker alone; renditions are public, and nginx
#: (www-data) serves them from disk.
_PRIVATE_DIR, _PUBLIC_DIR, _PUBLIC_FILE = 0o700, 0o755, 0o644


def write_atomically(path, data, mode=None):
    """Write bytes to path durably: temp file in the same directory, fsync,
    rename over path, fsync the directory so the rename itself survives.
    The file is 0600 (mkstemp's) unless ``mode`` says otherwise."""
    write_all_atomically(os.path.dirname(path), {os.path.basename(path): data}, mode)


def write_all_atomically(directory, files, mode=None):
    """write_atomically for several files ({name: bytes}) of one directory,
    with one fsync of the directory for all the renames (a job's renditions
    pay for one directory sync, not one each)."""
    commit(directory, stage(directory, files, mode))


def stage(directory, files, mode=None):
    """The first half of write_all_atomically: each of ``files`` ({name:
    bytes}) written to a temp file of its own in ``directory``, not synced:
    {name: temp path} for commit(). StorageFull if there is no space; on any
    error no temp file is left. The renderer child stages a job's
    renditions, so their bytes never cross the pipe to the worker; the
    worker commits them while the child renders the next job."""
    os.makedirs(directory, exist_ok=True)
    temps = {}
    try:
        for name, data in files.items():
            fd, temps[name] = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                _write_all(fd, data)
            finally:
                os.close(fd)
    except BaseException as error:
        _discard(temps)
        _raise_full_as_storage_full(error, directory)
        raise
    return temps


def commit(directory, temps):
    """The second half: each staged file ({name: temp path}) fsynced and
    renamed to its name, then the directory fsynced, so all are durable
    under their names. On an error the temp files left are removed: after a
    failed fsync their data is not to be trusted, so the caller writes (or
    renders) them again."""
    temps = dict(temps)
    try:
        for temp in temps.values():
            # Another process wrote it: an fsync through a new descriptor
            # still reports a writeback error nobody has seen (Linux 4.16+).
            fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name, temp in list(temps.items()):
            os.rename(temp, os.path.join(directory, name))
            del temps[name]
        _fsync_dir(directory)
    except BaseException as error:
        _discard(temps)
        _raise_full_as_storage_full(error, directory)
        raise


def _discard(temps):
    for temp in temps.values():
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def _raise_full_as_storage_full(error, directory):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"no space left below {directory}") from None


#: Written by the API into the root it stores uploads in. A worker renders
#: only below a root that has it: on a worker-only host, a root without it
#: is a shared filesystem that is not mounted (yet), and the jobs' records
#: and originals are not missing, only out of sight.
MARKER = ".imgworker-storage"


def _create(path, data):
    """A new file holding ``data``, not synced (O_EXCL: never an old one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _mark(record, mark):
    """``mark`` as a second name of ``record``, or an empty file where the
    filesystem has no hard links (some shared filesystems)."""
    try:
        os.link(record, mark)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        _create(mark, b"")


_libc = ctypes.CDLL(None, use_errno=True)


class GroupSync:
    """Waits until what this process wrote below ``path`` is durable, with
    one syncfs(2) of the filesystem for all the threads that wait at once
    (a group commit): a thread's sync is the next one to start after it
    called wait(), and whoever finds no sync running starts it for all.

    syncfs writes back and flushes the whole filesystem, the files' data and
    the directory entries, so one disk flush serves every upload stored
    meanwhile instead of four fsyncs per upload. The cost: it also writes
    out whatever else on that filesystem is dirty; storage on a filesystem
    of its own keeps that to imgworker's files."""

    def __init__(self, path):
        self._path = path
        self._changed = threading.Condition()
        self._requested = self._done = 0      # sync generations
        self._syncing = False
        self._failures = collections.deque(maxlen=64)  # (first, last, OSError)

    def wait(self):
        with self._changed:
            self._requested += 1
            mine = self._requested
            while self._done < mine:
                if self._syncing:
                    self._changed.wait()
                    continue
                first, last = self._done + 1, self._requested
                self._syncing = True
                self._changed.release()
                try:
                    error = self._syncfs()
                finally:
                    self._changed.acquire()
                    self._syncing = False
                    self._done = last
                    self._changed.notify_all()
                if error is not None:
                    self._failures.append((first, last, error))
            for first, last, error in self._failures:
                if first <= mine <= last:
                    raise error

    def _syncfs(self):
        """None, or the OSError every waiter of this sync raises."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            return error
        try:
            if _libc.syncfs(fd) != 0:
                code = ctypes.get_errno()
                return OSError(code, f"syncfs {self._path}: {os.strerror(code)}")
            return None
        finally:
            os.close(fd)


class Storage:
    def __init__(self, root):
        self.root = root
        self._group_sync = GroupSync(root)
        self._locks = _JobLocks(root)

    @property
    def marker_path(self):
        return os.path.join(self.root, MARKER)

    def is_shared_root(self):
        """True if the API's marker is here (see MARKER)."""
        return os.path.exists(self.marker_path)

    def _write_marker(self):
        if not self.is_shared_root():
            write_atomically(self.marker_path, json.dumps({
                "written_by": f"imgworker api on {socket.getfqdn()}",
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode() + b"\n",
                mode=_PUBLIC_FILE)

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
        return jobs.record_path(self.root, job_id)

    def _pending_path(self, job_id):
        return os.path.join(self.root, "jobs", job_id + ".pending")

    def prepare(self, marker=False):
        """Create the directory tree, or set its modes on one an older
        version made world-readable (the API and workers both call this);
        with ``marker`` (the API), mark it as the storage uploads go to."""
        if marker:
            os.makedirs(self.root, exist_ok=True)
            self._write_marker()
        for part, mode in (("originals", _PRIVATE_DIR), ("jobs", _PRIVATE_DIR),
                           ("grants", _PRIVATE_DIR), ("owners", _PRIVATE_DIR),
                           ("tombstones", _PRIVATE_DIR), ("erasing", _PRIVATE_DIR),
                           ("ended", _PRIVATE_DIR),
                           ("renditions", _PUBLIC_DIR)):
            path = os.path.join(self.root, part)
            os.makedirs(path, mode, exist_ok=True)
            if os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)
        # Made here, by the services' user, so that a command run as root
        # later does not make it root's.
        os.close(os.open(self._locks.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    # -- originals ---------------------------------------------------------
    def save_original(self, job_id, data):
        write_atomically(self.original_path(job_id), data)

    def store_upload(self, job, data):
        """A new job's original, its first record and its pending mark, all
        durable on return (StorageFull if there is no space left).

        Nothing reads these files before the job's message is published, so
        none needs a temp file of its own: the original is written under its
        name, the pending mark is a second name (a hard link) of the record,
        which is renamed into place only so that a crash never leaves half a
        record under its name. One group sync makes them all durable, shared
        with every upload stored meanwhile (GroupSync); the mark costs no
        inode to create or to free. Per upload this was two file and two
        directory fsyncs and a file created and deleted, each a wait on the
        disk that concurrent uploads could not share; the bench's ingest
        results compare the two."""
        record = self._job_path(job.id)
        temp = os.path.join(os.path.dirname(record), ".tmp-" + job.id)
        try:
            _create(self.original_path(job.id), data)
            _create(temp, job.to_json())
            _mark(temp, self._pending_path(job.id))
            if job.owner is None:
                os.rename(temp, record)
            else:
                # Under the job's lock: an owner's erasure that finds the
                # index entry lays the tombstone under that lock, so it finds
                # the record too, owner and all, and removes both.
                with self._locks.held(job.id):
                    self._index_owner(job.owner, job.id)
                    os.rename(temp, record)
            self._group_sync.wait()
        except OSError as error:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left below {self.root}") from None
            raise

    def has_original(self, job):
        """The job's original is on disk, all of it (the size its record
        names)."""
        try:
            return os.stat(self.original_path(job.id)).st_size == job.original["bytes"]
        except FileNotFoundError:
            return False

    def stage_renditions(self, job_id, outputs):
        """A job's renditions, [(rendition, bytes)], written under temp names
        in their directory but not yet durable (see stage()): what
        commit_renditions takes. The renderer child calls this, under the
        job's lock: a job erased meanwhile gets nothing written ({}), and
        its commit_renditions says Erased."""
        try:
            with self.unless_erased(job_id):
                return stage(self.rendition_dir(job_id), {
                    os.path.basename(self.rendition_path(job_id, rendition)): data
                    for rendition, data in outputs}, _PUBLIC_FILE)
        except Erased:
            return {}

    def commit_renditions(self, job_id, staged):
        """Make staged renditions durable under their names (see commit()).
        Erased if the job was erased meanwhile: then the staged files are
        removed instead, and the directory if nothing else is in it."""
        with self.unless_erased(job_id, discard=staged):
            commit(self.rendition_dir(job_id), staged)

    # -- job state ---------------------------------------------------------
    def read_job(self, job_id):
        """The job's record (a job.Job), or None for an unknown id."""
        return jobs.read(self.root, job_id) if is_job_id(job_id) else None

    def write_job(self, job):
        """The job's record, durably; Erased if the job was erased. A job
        that ended is entered in the index retention reads (ended_path)
        first, so a record that says it ended always has its entry."""
        with self.unless_erased(job.id):
            if job.ended is not None:
                self._enter_ended(job.id, job.ended)
            write_atomically(self._job_path(job.id), job.to_json())

    # -- retention (retention.py) -------------------------------------------------
    #: The ended index: ROOT/ended/<hour>/<id>, hour = the Unix hour the job
    #: ended in. gc reads only the hours whose jobs may have expired.
    HOUR = 3600

    def ended_path(self, job_id, ended):
        return os.path.join(self.root, "ended", str(int(ended // self.HOUR)), job_id)

    def _enter_ended(self, job_id, ended):
        path = self.ended_path(job_id, ended)
        if os.path.exists(path):
            return
        for _attempt in range(3):       # gc or an erasure may remove an hour left empty
            os.makedirs(os.path.dirname(path), _PRIVATE_DIR, exist_ok=True)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                break
            except FileNotFoundError:
                continue
        _fsync_dir(os.path.dirname(path))

    def ended_hours(self):
        """The hours (Unix time // 3600) that have jobs in the ended index."""
        try:
            return sorted(int(name) for name in os.listdir(os.path.join(self.root, "ended"))
                          if name.isdigit())
        except FileNotFoundError:
            return []

    def ended_in(self, hour):
        try:
            return sorted(name for name in os.listdir(os.path.join(self.root, "ended", str(hour)))
                          if is_job_id(name))
        except FileNotFoundError:
            return []

    def forget_ended(self, job_id, hour):
        """Drop an index entry that no longer says anything (its job ended
        at another time, or is gone); an hour left empty goes too."""
        directory = os.path.join(self.root, "ended", str(hour))
        try:
            os.unlink(os.path.join(directory, job_id))
            os.rmdir(directory)
        except OSError:
            pass                        # gone already; or the hour has others

    def remove_original(self, job_id, ended, when):
        """Retention's removal of a finished job's original, the record
        saying when; read again under the job's lock, so a job replayed or
        erased meanwhile is left alone (False)."""
        with self._locks.held(job_id):
            job = self.read_job(job_id)
            if (job is None or self.is_erased(job_id) or job.ended != ended
                    or "removed" in job.original):     # another gc run was first
                return False
            try:
                os.unlink(self.original_path(job_id))
            except FileNotFoundError:
                pass
            job.original_removed(when)
            write_atomically(self._job_path(job_id), job.to_json())
            return True

    # -- erasure (erasure.py) ----------------------------------------------------
    @contextlib.contextmanager
    def unless_erased(self, job_id, discard=None, timeout=None):
        """Run the block under the job's lock if it has no tombstone; else
        Erased (removing ``discard``, staged files, first). An erasure writes
        the tombstone under the same lock, so nothing written in such a
        block outlives the erasure that follows it, and nothing is written
        after."""
        with self._locks.held(job_id, timeout):
            if self.is_erased(job_id):
                if discard:
                    _discard(discard)
                    try:
                        os.rmdir(self.rendition_dir(job_id))
                    except OSError:
                        pass            # gone already, or not empty: not ours
                raise Erased(job_id)
            yield

    def tombstone_path(self, job_id):
        return os.path.join(self.root, "tombstones", job_id)

    def is_erased(self, job_id):
        return os.path.exists(self.tombstone_path(job_id))

    def read_tombstone(self, job_id):
        """The job's tombstone, or None. One a crash left unreadable (an
        older version wrote them in place) still says the job is erased: its
        event goes out again, with no owner."""
        try:
            with open(self.tombstone_path(job_id), "rb") as handle:
                tombstone = json.loads(handle.read())
            if isinstance(tombstone, dict) and tombstone.get("id") == job_id:
                return tombstone
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        return {"id": job_id, "owner": None, "ended": None, "reason": "request",
                "at": None, "announced": False}

    def lay_tombstone(self, job_id, reason, timeout):
        """Write a job's tombstone under the job's lock, and its erasing
        mark; not yet durable (sync()). The tombstone ({"id", "owner",
        "ended", "reason", "at", "announced"}) is made from the record as it
        is under the lock, so no write of the job comes between. None if the
        job had one already; LookupError if there is no such job."""
        with self._locks.held(job_id, timeout):
            if self.is_erased(job_id):
                return None
            job = self.read_job(job_id)
            if job is None and not self.has_files(job_id):
                raise LookupError(job_id)
            tombstone = {"id": job_id, "owner": job.owner if job else None,
                         "ended": job.ended if job else None, "reason": reason,
                         "at": time.time(), "announced": False}
            # the mark may be left from an erasure cut short before its
            # tombstone: not O_EXCL
            os.close(os.open(os.path.join(self.root, "erasing", job_id),
                             os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # whole or absent, whenever the process dies
            temp = os.path.join(self.root, "tombstones", ".tmp-" + job_id)
            with open(temp, "wb") as handle:
                handle.write(json.dumps(tombstone).encode())
            os.rename(temp, self.tombstone_path(job_id))
        return tombstone

    def update_tombstone(self, tombstone):
        """Rewrite a tombstone, whole or not at all; not yet durable (sync():
        one for an erasure's thousand tombstones, not two fsyncs each)."""
        name = tombstone["id"]
        temps = stage(os.path.dirname(self.tombstone_path(name)),
                      {name: json.dumps(tombstone).encode()})
        os.rename(temps[name], self.tombstone_path(name))

    def finish_erasing(self, job_id):
        """The erasure of job_id is over: its erasing mark goes."""
        try:
            os.unlink(os.path.join(self.root, "erasing", job_id))
        except FileNotFoundError:
            pass

    def unfinished_erasures(self, older_than=0):
        return self._older(os.path.join(self.root, "erasing"), "", older_than)

    # An erasure by owner is written down first, as erasing/owner-<hash>
    # holding the owner, so that one cut short while it lays its tombstones
    # is run again whole by the sweep.
    def begin_owner_erasure(self, owner):
        write_atomically(os.path.join(self.root, "erasing", "owner-" + owner_key(owner)),
                         owner.encode())

    def end_owner_erasure(self, owner):
        try:
            os.unlink(os.path.join(self.root, "erasing", "owner-" + owner_key(owner)))
        except FileNotFoundError:
            pass

    def unfinished_owner_erasures(self, older_than=0):
        limit, owners = time.time() - older_than, []
        try:
            entries = list(os.scandir(os.path.join(self.root, "erasing")))
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                if entry.name.startswith("owner-") and entry.stat().st_mtime < limit:
                    with open(entry.path, "rb") as handle:
                        owners.append(handle.read().decode())
            except (OSError, UnicodeDecodeError):
                pass
        return owners

    def remove_job_files(self, job_id, owner, ended=None):
        """Every file of an erased job: renditions, original, record,
        pending mark, owner index and ended index entries; not yet durable
        (sync())."""
        job = self.read_job(job_id)
        if job is not None:             # a tombstone a crash left unreadable names neither
            owner, ended = owner or job.owner, ended or job.ended
        directory = self.rendition_dir(job_id)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            names = []
        paths = [os.path.join(directory, name) for name in names]
        paths += [self.original_path(job_id), self._job_path(job_id),
                  self._pending_path(job_id)]
        if owner is not None:
            paths.append(os.path.join(self.root, "owners", owner_key(owner), job_id))
        if ended is not None:
            paths.append(self.ended_path(job_id, ended))
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if ended is not None:
            try:
                os.rmdir(os.path.dirname(self.ended_path(job_id, ended)))
            except OSError:
                pass                    # other jobs ended in that hour
        try:
            os.rmdir(directory)
        except OSError:
            pass                        # gone already

    def has_files(self, job_id):
        return any(os.path.exists(path) for path in (
            self._job_path(job_id), self.original_path(job_id), self.rendition_dir(job_id)))

    def sync(self):
        """Make every change this process made below the root durable."""
        self._group_sync.wait()

    def _index_owner(self, owner, job_id):
        directory = os.path.join(self.root, "owners", owner_key(owner))
        os.makedirs(directory, _PRIVATE_DIR, exist_ok=True)
        _create(os.path.join(directory, job_id), b"")

    def owner_jobs(self, owner):
        """The ids of the owner's jobs: one directory read, whatever else is
        stored."""
        try:
            return sorted(name for name in os.listdir(os.path.join(self.root, "owners",
                                                                   owner_key(owner)))
                          if is_job_id(name))
        except FileNotFoundError:
            return []

    def forget_job(self, job_id):
        """Remove an upload the broker never accepted (the client got 503)."""
        job = self.read_job(job_id)
        owned = ([os.path.join(self.root, "owners", owner_key(job.owner), job_id)]
                 if job is not None and job.owner is not None else [])
        for path in (self._job_path(job_id), self.original_path(job_id),
                     self._pending_path(job_id), *owned):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- uploads the API may have died on -------------------------------------
    # store_upload() marks a new job pending, and the API clears the mark
    # once the broker confirmed the job. A mark lost after the confirm only
    # makes the sweep queue a job twice, which workers recognise ("already
    # done").

    def clear_pending(self, job_id):
        try:
            os.unlink(self._pending_path(job_id))
        except FileNotFoundError:
            pass

    def _older(self, directory, suffix, seconds):
        limit = time.time() - seconds
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        return [entry.name[:len(entry.name) - len(suffix)] for entry in entries
                if entry.name.endswith(suffix) and is_job_id(entry.name[:len(entry.name) - len(suffix)])
                and entry.stat().st_mtime < limit]

    def remove_stale_temp_files(self, older_than):
        """Temp files a crash left mid-write (never visible under a real
        name, so never served); returns how many were removed."""
        limit, removed = time.time() - older_than, 0
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = os.path.join(directory, name)
                # Live writers rename their temp files away at any moment.
                try:
                    if os.stat(path).st_mtime < limit:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- what the storage holds (the sweep measures it; status and /metrics
    # read the figure) ---------------------------------------------------------
    USAGE = "usage.json"

    def measure(self):
        """{kind: {"files", "bytes"}} of originals, renditions and records
        (job records, with their marks), written to ROOT/usage.json with the
        time: one pass over the tree, made by the sweep every few minutes,
        so that a scrape reads a small file instead of walking the tree."""
        found = {kind: {"files": 0, "bytes": 0} for kind in ("originals", "renditions", "records")}

        def count(kind, directory, depth=0):
            try:
                entries = os.scandir(directory)
            except FileNotFoundError:
                return
            with entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if depth == 0:
                                count(kind, entry.path, 1)
                        elif not entry.name.startswith(".tmp-") \
                                and not entry.name.endswith(".pending"):  # a record's 2nd name
                            found[kind]["files"] += 1
                            found[kind]["bytes"] += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass            # removed while we looked
        count("originals", os.path.join(self.root, "originals"))
        count("renditions", os.path.join(self.root, "renditions"))
        count("records", os.path.join(self.root, "jobs"))
        write_atomically(os.path.join(self.root, self.USAGE),
                         json.dumps({"at": time.time(), **found}).encode(), _PUBLIC_FILE)
        return found

    def usage(self):
        """What the last measure() found, with its time ("at"); None if
        none has run yet. Also the filesystem's size and free bytes, read
        now."""
        try:
            with open(os.path.join(self.root, self.USAGE), "rb") as handle:
                found = json.loads(handle.read())
        except (FileNotFoundError, ValueError):
            found = None
        try:
            stat = os.statvfs(self.root)
        except FileNotFoundError:
            return found
        return {**(found or {}), "filesystem": {"size": stat.f_blocks * stat.f_frsize,
                                                "free": stat.f_bavail * stat.f_frsize}}

    def pending_jobs(self, older_than):
        """Ids marked pending for more than ``older_than`` seconds."""
        return self._older(os.path.join(self.root, "jobs"), ".pending", older_than)

    def orphan_originals(self, older_than):
        """Originals older than ``older_than`` seconds that have no job state:
        the API died before the upload was accepted, so nobody was promised
        anything."""
        return [job_id for job_id in self._older(os.path.join(self.root, "originals"), "",
                                                 older_than)
                if not os.path.exists(self._job_path(job_id))]
