"""What the erasure tests (tests/integration/test_erasure.py, and the cluster
scenario in tests/faults/test_cluster_faults.py) look at: the files of a job
below a storage root, the events on imgworker.events, and a worker's
renderer caught in the middle of decoding a job (held still with SIGSTOP,
the test's way to slow the render down to a moment it chooses); and the
few steps they all take: upload with a key, stop the workers and find the
queues empty."""

import functools
import json
import os
import re
import signal
import time

import pika

from imgworker import broker
from imgworker.storage import LockTimeout, Storage

from harness import samples
from harness.pipeline import wait_until


@functools.lru_cache(maxsize=None)
def big_jpeg():
    """24 MP: about a second of rendering here, time enough to catch it."""
    return samples.jpeg(6000, 4000)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def upload(pipeline, image, owner=None, key=None):
    """An upload's id; ?owner= counts only with a key (an anonymous upload
    names no owner)."""
    response = pipeline.upload(image, params={"owner": owner} if owner else None,
                               headers=bearer(key) if key else {})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def settle(pipeline, *workers):
    """Stop the workers (what they held unacknowledged goes back to the
    queue) and assert the job queue and the dead-letter queue are empty."""
    for worker in workers:
        assert worker.stop() == 0, worker.log()
    assert pipeline.queue_depth() == 0
    assert pipeline.queue_depth(pipeline.dead_letter_queue) == 0


def files_of(root, job_ids):
    """{job id: [paths below root naming it]} for each job that still has
    any: originals/, jobs/ (record, .pending, temp files), renditions/<id>/
    and what is in it, owners/*/<id>, erasing/<id>; its tombstone aside."""
    wanted, found = set(job_ids), {}
    tombstones = os.path.join(root, "tombstones")
    for directory, dirs, files in os.walk(root):
        for name in files + dirs:
            path = os.path.join(directory, name)
            if directory == tombstones:
                continue
            relative = os.path.relpath(path, root)
            for job_id in set(re.findall(r"[0-9a-f]{32}", relative)) & wanted:
                found.setdefault(job_id, []).append(relative)
    return {job_id: sorted(paths) for job_id, paths in found.items()}


def nothing_of(pipeline, *job_ids):
    """Assert no file of the jobs is below the root, and each has its tombstone."""
    left = files_of(pipeline.root, job_ids)
    assert not left, f"files of erased jobs left on disk: {left}"
    for job_id in job_ids:
        assert os.path.exists(os.path.join(pipeline.root, "tombstones", job_id)), job_id


class Events:
    """A queue of the test's own bound to imgworker.events with job.*, bound
    when made (before the actions under test), as an app would bind one.
    ``amqp_url``: the node to bind through (the pipeline's URL by default);
    on a cluster the exchange is the cluster's, whichever node a publisher
    talks to."""

    def __init__(self, pipeline, amqp_url=None):
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url
                                                                     or pipeline.amqp_url))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(broker.EVENTS_EXCHANGE, "topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, broker.EVENTS_EXCHANGE, routing_key="job.*")
        self.seen = []          # [(routing key, body)] in the order they arrived

    def read(self, until=None, timeout=30, quiet=0.5):
        """Read what arrived; until ``until(seen)`` is true (or ``timeout``),
        then on until nothing came for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is not None:
                assert properties.delivery_mode == broker.PERSISTENT
                self.seen.append((method.routing_key, json.loads(body)))
                last = time.monotonic()
                continue
            if (until is None or until(self.seen)) and time.monotonic() - last > quiet:
                break
            self.connection.sleep(0.05)
        return self.seen

    def deleted(self, job_ids):
        """The job.deleted bodies of these jobs (the exchange is the
        broker's, shared with whatever else runs on it)."""
        job_ids = set(job_ids)
        return [body for key, body in self.seen
                if key == "job.deleted" and body.get("id") in job_ids]

    def of(self, job_id):
        """The routing keys of the job's events, in the order they came."""
        return [key for key, body in self.seen if body.get("id") == job_id]

    def assert_deleted_last(self, job_id, owner):
        """job.deleted came for the job, with its owner and reason request, and
        no job.done/job.failed of it after."""
        if not self.deleted([job_id]):
            self.read(lambda seen: self.deleted([job_id]))
        ofjob = [(key, body) for key, body in self.seen if body.get("id") == job_id]
        keys = [key for key, _ in ofjob]
        assert "job.deleted" in keys, ofjob
        first = keys.index("job.deleted")
        assert ofjob[first][1] == {"id": job_id, "owner": owner, "reason": "request"}
        assert set(keys[first:]) == {"job.deleted"}, f"an end event after job.deleted: {keys}"

    def close(self):
        self.connection.close()


def stopped_mid_render(pipeline, worker, job_id):
    """The worker's renderer, SIGSTOPped while it decodes the job: it reads
    the original's pixels, past the header walk (images._open maps the file
    to walk it, closes it, and opens it again to decode). Not merely busy:
    a fresh renderer spends its first CPU importing Pillow."""
    storage = Storage(pipeline.root)
    original = storage.original_path(job_id)
    pid = worker.renderer_pid()

    def decoding():
        with open(f"/proc/{pid}/maps") as handle:
            if original in handle.read():
                return False            # the header walk
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == original:
                    with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                        position = int(handle.readline().split()[1])
                    return position > 1 << 20
            except FileNotFoundError:
                pass
        return False
    deadline = time.monotonic() + 30
    while not decoding():
        assert time.monotonic() < deadline, f"the renderer {pid} never decoded {original}"
        time.sleep(0.002)
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: _state(pid) == "T", f"the renderer {pid} to stop", timeout=10,
               interval=0.005)
    if decoding():
        return pid
    # Stopped a moment after it was seen decoding (this process was slow to
    # send the signal, on a loaded machine): as good, so long as it has not
    # begun to stage the renditions -- under the job's lock, into their
    # directory -- nor ended the job.
    staging = os.path.exists(storage.rendition_dir(job_id)) or not _lock_free(storage, job_id)
    assert not staging and not waiting_for_work(pid), \
        "the render ended before the renderer could be stopped"
    return pid


def _state(pid):
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def _lock_free(storage, job_id):
    try:
        with storage._locks.held(job_id, timeout=0):
            return True
    except LockTimeout:
        return False


def waiting_for_work(pid):
    """Whether a renderer child sleeps reading its connection to the worker
    (a socket): what it does between jobs, and only then -- mid-job it
    only sends. x86-64's read is syscall 0; /proc/PID/syscall says
    "running" while it runs."""
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            fields = handle.read().split()
        if len(fields) < 2 or fields[0] != "0":
            return False
        return os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}").startswith("socket:")
    except (FileNotFoundError, ValueError):
        return False


def let_finish(pid, timeout=60):
    """SIGCONT a renderer stopped mid-render (stopped_mid_render) and wait
    until it is done with the job: its renditions staged (or, for an erased
    job, not), its answer sent, and back to waiting for the next job."""
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: waiting_for_work(pid), f"the renderer {pid} to finish its job",
               timeout, interval=0.02)
