"""Rendering in a child process, so one input can neither hold a worker for
minutes nor take it down.

Pillow runs C decoders; a thread cannot be interrupted, and a crash (or the
OOM killer) in one takes the whole process with it. The worker therefore
hands each job to a long-lived child over a pipe: past ``job_timeout`` the
child is killed and the job fails with that reason; if the child dies, the
attempt fails and the job is retried like any other transient failure, up to
``max_attempts``. A fresh child is started for the next job.

The child reads the original and writes the renditions itself, under temp
names (Storage.stage_renditions): only their measures cross the pipe, and
the worker makes them durable (Storage.commit_renditions) while the child
renders the next job. Sending the encoded renditions back through the pipe
kept the child waiting on the worker in every job, and copied each byte
twice more. Writing them costs the child some CPU, but saves the worker
more, and the renderers spend a larger share of a drain rendering: what it
cost and saved is measured in bench/results/ingest, not kept here.

The child is spawned (not forked): the worker has threads, and fork() of a
threaded process copies locks in whatever state they were in.
"""

import logging
import multiprocessing
import resource
import signal
import time
import typing

from . import allocator, images
from .storage import Storage, StorageFull

logger = logging.getLogger(__name__)


class RenderTimeout(Exception):
    """The job took longer than job_timeout; the same input would again."""


class RendererDied(Exception):
    """The child process died mid-job (a decoder crash, the OOM killer)."""


class Output(typing.NamedTuple):
    """One rendition of a job, as its record describes it."""
    rendition: object   # config.Rendition
    width: int
    height: int
    size: int           # bytes


class Staged(typing.NamedTuple):
    """A job rendered: its renditions written under temp names, not yet
    durable."""
    outputs: list       # [Output], largest first
    files: dict         # what Storage.commit_renditions takes


def render_job(storage, job_id, renditions, limits, progress=lambda: None):
    """Render the job's original and stage its renditions: a Staged. Raises
    what images.render raises, and StorageFull. What the child runs for
    each job."""
    outputs = images.render(storage.original_path(job_id), renditions, limits, progress)
    files = storage.stage_renditions(job_id, [(output.rendition, output.data)
                                              for output in outputs])
    return Staged([Output(output.rendition, output.width, output.height, len(output.data))
                   for output in outputs], files)


def _serve(connection, root, renditions, limits):
    """The child: render each job it is sent, until the pipe closes."""
    # SIGTERM/SIGINT go to the worker, which decides when the child ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A spawned child starts with glibc's defaults, as the worker did.
    allocator.tune("render")
    # Past [worker] max_render_memory an allocation fails (MemoryError: the
    # job fails with that reason) before the cgroup's OOM killer would pick
    # a process. RLIMIT_DATA counts the heap and anonymous mmaps, which is
    # where decoders put pixels; the units allow setrlimit for this.
    resource.setrlimit(resource.RLIMIT_DATA, (limits.max_render_bytes, limits.max_render_bytes))
    images.install_pillow_backstop(limits)
    storage = Storage(root)
    while True:
        try:
            job_id = connection.recv()
        except EOFError:
            return
        try:
            staged = render_job(storage, job_id, renditions, limits,
                                progress=lambda: connection.send(("progress",)))
            connection.send(("done", staged))
        except images.UnsupportedFormat as error:
            connection.send(("unsupported", str(error)))
        except images.BadImage as error:
            connection.send(("bad", str(error)))
        except StorageFull as error:
            connection.send(("full", str(error)))
        except Exception as error:  # noqa: BLE001 - reported to the worker, which retries
            connection.send(("error", f"{type(error).__name__}: {error}"))


class Renderer:
    """A child process that renders one job at a time for one worker thread,
    the jobs' files below the storage root ``root``."""

    def __init__(self, root, renditions, limits, job_timeout):
        self._root = root
        self._renditions = renditions
        self._limits = limits
        self._timeout = job_timeout
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._connection = None

    def _start(self):
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve, args=(child, self._root, self._renditions, self._limits),
            name="imgworker-render", daemon=True)
        self._process.start()
        child.close()
        self._connection = parent

    def stop(self):
        if self._process is None:
            return
        self._connection.close()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._process = self._connection = None

    def _kill(self):
        self._process.kill()
        self._process.join()
        self._connection.close()
        self._process = self._connection = None

    def _died(self):
        self._process.join(5)
        code = self._process.exitcode
        self._kill()
        how = (f"signal {signal.Signals(-code).name}" if code and code < 0
               else f"exit status {code}")
        return RendererDied(f"the renderer process died ({how})")

    def render(self, job_id, progress=lambda: None):
        """render_job for the job, in the child: a Staged. Raises what
        render_job raises, and RenderTimeout or RendererDied."""
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._connection.send(job_id)
        except OSError:
            raise self._died() from None
        deadline = time.monotonic() + self._timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._connection.poll(remaining):
                self._kill()
                raise RenderTimeout(f"rendering took longer than {self._timeout:g} s "
                                    "([worker] job_timeout)")
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                raise self._died() from None
            kind = message[0]
            if kind == "progress":
                progress()
            elif kind == "done":
                return message[1]
            elif kind == "unsupported":
                raise images.UnsupportedFormat(message[1])
            elif kind == "bad":
                raise images.BadImage(message[1])
            elif kind == "full":
                raise StorageFull(message[1])
            else:
                raise RuntimeError(message[1])
