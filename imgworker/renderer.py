"""Rendering in a child process, so one input can neither hold a worker for
minutes nor take it down.

Pillow runs C decoders; a thread cannot be interrupted, and a crash (or the
OOM killer) in one takes the whole process with it. The worker therefore
hands each job to a long-lived child over a pipe: past ``job_timeout`` the
child is killed and the job fails with that reason; if the child dies, the
attempt fails and the job is retried like any other transient failure, up to
``max_attempts``. A fresh child is started for the next job.

The child is spawned (not forked): the worker has threads, and fork() of a
threaded process copies locks in whatever state they were in.
"""

import logging
import multiprocessing
import resource
import signal
import time

from . import images

logger = logging.getLogger(__name__)


class RenderTimeout(Exception):
    """The job took longer than job_timeout; the same input would again."""


class RendererDied(Exception):
    """The child process died mid-job (a decoder crash, the OOM killer)."""


def _serve(connection, renditions, limits):
    """The child: render each job it is sent, until the pipe closes."""
    # SIGTERM/SIGINT go to the worker, which decides when the child ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Past [worker] max_render_memory an allocation fails (MemoryError: the
    # job fails with that reason) before the cgroup's OOM killer would pick
    # a process. RLIMIT_DATA counts the heap and anonymous mmaps, which is
    # where decoders put pixels; the units allow setrlimit for this.
    resource.setrlimit(resource.RLIMIT_DATA, (limits.max_render_bytes, limits.max_render_bytes))
    images.install_pillow_backstop(limits)
    while True:
        try:
            path = connection.recv()
        except EOFError:
            return
        try:
            outputs = images.render(path, renditions, limits,
                                    progress=lambda: connection.send(("progress",)))
            connection.send(("done", outputs))
        except images.UnsupportedFormat as error:
            connection.send(("unsupported", str(error)))
        except images.BadImage as error:
            connection.send(("bad", str(error)))
        except Exception as error:  # noqa: BLE001 - reported to the worker, which retries
            connection.send(("error", f"{type(error).__name__}: {error}"))


class Renderer:
    """A child process that renders one job at a time for one worker thread."""

    def __init__(self, renditions, limits, job_timeout):
        self._renditions = renditions
        self._limits = limits
        self._timeout = job_timeout
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._connection = None

    def _start(self):
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve, args=(child, self._renditions, self._limits),
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

    def render(self, path, progress=lambda: None):
        """images.render of the file at ``path``, in the child (which reads
        the file itself: the upload is never copied through the pipe).
        Raises what images.render raises, and RenderTimeout or RendererDied."""
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._connection.send(path)
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
            else:
                raise RuntimeError(message[1])
