"""Erasure and retention (issue 24): what they cost, and what the tombstone
checks cost ingest and drain.

- Erasure by owner: one owner's jobs erased among 100,000 stored, and the
  same among 10,000, through the path a user takes: DELETE
  /owners/<owner>/jobs with a key of scope delete, straight to the API
  (its gunicorn), which lays the tombstones, removes the files, syncs and
  has RabbitMQ confirm a job.deleted per job before it answers. The bench
  counts the job.deleted events on a queue of its own. The two stores are
  erased from in turn, run after run, a different owner each time.
- gc (retention.collect, at a time the bench gives it) over the same
  stores, 1% of their jobs expired since the last run, and again with
  nothing expired since the last run: its cost follows what expired.
- Ingest and drain with the tombstone checks on (the tree as it is, auth
  off), against release 0.1.0 (BEFORE) and against the commit just before
  the first erasure commit (JUST_BEFORE, which has issue 23's auth_request
  already), each exported from git and run with its own nginx site:
  uploads/s through nginx (bench/load.py, as bench/auth.py) and jobs/s
  drained by 2 workers (bench/endtoend.py's drain), trees interleaved.

The stores are written straight to disk in the layout imgworker.storage
uses, with its own path functions: a done job has its original, record,
three renditions, an owner index entry and an ended index entry (a failed
job no renditions), all synced before anything is timed. The files are
small (a 4 KiB original, 1 KiB renditions): what an erasure or gc costs
goes with the number of files and fsyncs, not their bytes.
"""

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
import typing
import uuid

import pika
import requests

from harness.pipeline import REPO, Pipeline
from imgworker import config, retention
from imgworker.job import Job, State, record_path
from imgworker.storage import Storage, owner_key, write_atomically

from . import auth, endtoend, ingest

#: Release 0.1.0, the release before issue 24 (bench/auth.py's BEFORE).
BEFORE = auth.BEFORE
#: The commit just before the first erasure commit (e62c08c): issue 23's
#: auth is in it, so beside it the tombstone checks' cost stands alone.
JUST_BEFORE = "3ebbd83ffe9ca2efc643ec633a2276de9660b59b"

#: The report's row names.
NOW = "imgworker now (tombstone checks on, auth off)"
TREES = {BEFORE: f"imgworker {BEFORE[:7]} (release 0.1.0, baseline)",
         JUST_BEFORE: f"imgworker {JUST_BEFORE[:7]} (just before erasure, auth off)"}

#: The stores' sizes (jobs kept besides the owners erased), full and smoke.
TOTALS, SMOKE_TOTALS = (100_000, 10_000), (1_000, 100)

HOUR, DAY = 3600, 86400
ORIGINAL = bytes(4096)
RENDITION = bytes(1024)


def store_name(total):
    return f"{total:,} stored"


# -- stores ---------------------------------------------------------------------------

class Store(typing.NamedTuple):
    total: int                  # background jobs (gc's figure)
    pipeline: Pipeline
    key: str                    # an API key of scope delete
    owners: list                # the owners erased, one per run, each with per_owner jobs
    per_owner: int
    now: float                  # when gc last ran (gc.json says so)
    batches: int                # gc rounds: batch k expires at now + k days
    expired: int                # jobs per batch (1% of total)


def _write(path, data=b""):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def populate(root, jobs):
    """``jobs`` [(owner, failed, ended)] written below ``root`` as
    imgworker's storage lays them out, then synced. Returns their ids."""
    storage = Storage(root)
    storage.prepare(marker=True)
    renditions = config.load(os.devnull).renditions
    made, ids = set(), []
    for owner, failed, ended in jobs:
        job_id = uuid.uuid4().hex
        ids.append(job_id)
        job = Job(job_id, State.FAILED if failed else State.DONE,
                  {"format": "jpeg", "width": 4000, "height": 3000, "bytes": len(ORIGINAL)},
                  attempts=1, worker="bench", owner=owner, started_at=ended - 0.4,
                  ended_at=ended, seconds=0.4, updated_at=ended)
        _write(storage.original_path(job_id), ORIGINAL)
        if failed:
            job.error = "the image could not be decoded (bench)"
        else:
            job.renditions = {r.name: {"url": Storage.rendition_url(job_id, r),
                                       "width": r.width, "height": r.height, "format": r.format,
                                       "bytes": len(RENDITION)} for r in renditions}
            os.mkdir(storage.rendition_dir(job_id), 0o755)
            for r in renditions:
                _write(storage.rendition_path(job_id, r), RENDITION)
        _write(record_path(root, job_id), job.to_json())
        for directory, name in ((os.path.join(root, "owners", owner_key(owner)), job_id),
                                os.path.split(storage.ended_path(job_id, ended))):
            if directory not in made:
                os.makedirs(directory, 0o700, exist_ok=True)
                made.add(directory)
            _write(os.path.join(directory, name))
    storage.sync()
    return ids


def layout(total, per_owner, runs, batches, now, period):
    """[(owner, failed, ended)]: ``total`` background jobs of owners with
    100 jobs each, one in 20 failed, of which ``batches`` x 1% ended in the
    days after ``now`` - ``period`` (batch k expires at now + k days), the
    rest since (none expires in the bench's rounds); then ``runs`` owners
    with ``per_owner`` done jobs each, and a warm-up owner's 10."""
    expired = max(1, total // 100)
    recent = total - batches * expired
    start, span = now - period + batches * DAY + HOUR, period - batches * DAY - HOUR - 60
    jobs = []
    for i in range(total):
        if i < batches * expired:
            k, j = divmod(i, expired)
            ended = now - period + k * DAY + (j + 0.5) * DAY / expired
        else:
            ended = start + (i - batches * expired + 0.5) * span / recent
        jobs.append((f"bench-owner-{i % (total // 100 or 1)}", i % 20 == 0, ended))
    owners = [f"bench-erase-{run}-{uuid.uuid4().hex[:6]}" for run in range(runs)]
    for n, owner in enumerate(owners + ["bench-warm-up"]):
        count = per_owner if owner in owners else 10
        jobs += [(owner, False, start + (j + (n + 1) / (runs + 2)) * span / count)
                 for j in range(count)]
    return jobs, owners, expired


@contextlib.contextmanager
def filesystem(workdir, log=print, size=16 << 30):
    """A directory on an ext4 filesystem of its own (a loop device, a
    sparse image file of ``size`` bytes below ``workdir``), as storage.py
    advises for the storage root (syncfs then writes back imgworker's files
    alone, not what the other processes of this shared machine wrote);
    yields (path, what it is). Without the rights for a loop mount: a
    directory of ``workdir``."""
    image, mount = os.path.join(workdir, "stores.img"), os.path.join(workdir, "stores")
    os.makedirs(mount)
    try:
        with open(image, "wb") as handle:
            handle.truncate(size)                    # sparse
        # an inode per 4 KiB: a job is 8 of them, most 4 KiB or less
        subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "4096", image], check=True,
                       capture_output=True)
        subprocess.run(["mount", "-o", "loop", image, mount], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log(f"  no filesystem of its own for the stores ({error}; "
            f"{detail.decode(errors='replace').strip()}): they go to {workdir}")
        with contextlib.suppress(OSError):
            os.unlink(image)
        yield mount, f"a directory of {workdir}"
        return
    try:
        yield mount, "an ext4 filesystem of its own (a loop device, its image on the same disk)"
    finally:
        subprocess.run(["umount", mount], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            os.unlink(image)


def make_store(workdir, stores, amqp_url, total, per_owner, runs, batches, log=print):
    run_dir = os.path.join(workdir, f"erasure-{total}-{uuid.uuid4().hex[:6]}")
    os.makedirs(run_dir)
    pipeline = Pipeline(amqp_url, run_dir, api={"workers": "1"},
                        storage={"root": os.path.join(stores, os.path.basename(run_dir))})
    retention_config = config.load(pipeline.config_path).retention
    period = retention_config.originals
    assert period == retention_config.failed, "the bench's layout expects one period"
    now = (time.time() // HOUR) * HOUR + HOUR / 2            # gc "last ran" mid-hour
    jobs, owners, expired = layout(total, per_owner, runs, batches, now, period)
    started = time.monotonic()
    populate(pipeline.root, jobs)
    # as gc.json is after a run at ``now``
    last = int((now - period) // HOUR)
    write_atomically(os.path.join(pipeline.root, "gc.json"),
                     json.dumps({"originals": last, "failed": last}).encode())
    log(f"  {len(jobs):,} jobs written and synced in {time.monotonic() - started:.1f} s "
        f"({total:,} to keep, {runs} owner(s) of {per_owner:,} to erase, 10 to warm up)")
    key = pipeline.add_key("bench-eraser", "delete")
    pipeline.start_api()
    return Store(total, pipeline, key, owners, per_owner, now, batches, expired)


def stored(root):
    return sum(1 for name in os.listdir(os.path.join(root, "jobs")) if name.endswith(".json"))


# -- job.deleted, counted ---------------------------------------------------------------

class Events:
    """A queue of the bench's own bound to job.deleted on imgworker.events."""

    def __init__(self, amqp_url):
        from imgworker import broker
        self.connection = pika.BlockingConnection(
            [pika.URLParameters(url) for url in config.split_urls(amqp_url)])
        self.channel = self.connection.channel()
        self.channel.exchange_declare(broker.EVENTS_EXCHANGE, "topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, broker.EVENTS_EXCHANGE,
                                routing_key=broker.JOB_DELETED)

    def take(self):
        """The bodies that arrived since the last take()."""
        found = []
        while True:
            method, _properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return found
            found.append(json.loads(body))

    def close(self):
        self.connection.close()


# -- erasure by owner ------------------------------------------------------------------

class EraseRun(typing.NamedTuple):
    stored: int          # jobs on the storage when the run began
    erased: int          # what the API answered
    seconds: float       # the DELETE, request to answer
    events: int          # job.deleted seen for that owner


def erase_owner(store, owner, events):
    before = stored(store.pipeline.root)
    started = time.perf_counter()
    response = requests.delete(f"{store.pipeline.base_url}/owners/{owner}/jobs",
                               headers={"Authorization": f"Bearer {store.key}"}, timeout=600)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    seen = sum(1 for event in events.take() if event.get("owner") == owner)
    return EraseRun(before, response.json()["erased"], seconds, seen)


# -- gc ---------------------------------------------------------------------------------

class GcRun(typing.NamedTuple):
    stored: int
    read: int             # ended index entries read (for each period: twice a job)
    originals: int
    erased: int
    seconds: float
    events: int           # job.deleted (reason retention) seen


def gc(store, at, events):
    settings = config.load(store.pipeline.config_path)
    storage = Storage(store.pipeline.root)
    before = stored(store.pipeline.root)
    started = time.perf_counter()
    collected = retention.collect(settings, now=at, storage=storage)
    seconds = time.perf_counter() - started
    seen = sum(1 for event in events.take() if event.get("reason") == "retention")
    return GcRun(before, collected.read, collected.originals, collected.erased, seconds, seen)


# -- ingest and drain against the releases before ------------------------------------------

def _shipped_workers(source):
    """The tree's shipped [api] workers."""
    with open(os.path.join(source, "imgworker", "config.py"), encoding="utf-8") as handle:
        return re.search(r'"workers": Option\("(\d+)"', handle.read()).group(1)


def _open(source):
    """The config sections that take uploads without credentials in this
    tree: [auth] required = false where it has [auth] (the current tree's
    pipeline says so already)."""
    if source == REPO:
        return {}
    with open(os.path.join(source, "imgworker", "config.py"), encoding="utf-8") as handle:
        has_auth = '"required": Option(' in handle.read()
    return {"auth": {"required": "false"}} if has_auth else {}


#: What harness.pipeline.Nginx rewrites in a tree's nginx/snippets (the
#: access log of the tree's own format); trees from issue 23's first commits
#: to 6bb958e have the snippet without it.
_ACCESS_LOG = "access_log /var/log/nginx/access.log imgworker;"


def _runnable(tree):
    """Let harness.pipeline.Nginx run an exported tree whose snippet has no
    access_log line: the line it looks for is added as a comment, which
    changes nothing in the site (the harness's nginx.conf logs every
    request at the http level anyway)."""
    snippet = os.path.join(tree, "nginx", "snippets", "imgworker-locations.conf")
    if os.path.exists(snippet):
        with open(snippet, encoding="utf-8") as handle:
            text = handle.read()
        if _ACCESS_LOG not in text:
            with open(snippet, "a", encoding="utf-8") as handle:
                handle.write(f"\n# added by bench/erasure.py for harness.pipeline: "
                             f"# {_ACCESS_LOG}\n")
    return tree


def ingest_run(workdir, amqp_url, design, source, body_path, connections, seconds):
    """One bench/load.py run through nginx against a fresh pipeline of
    ``source``: an auth.AuthRun (its ingest.IngestResult, and the CPU ms
    each process group spent per accepted upload)."""
    run_dir = os.path.join(workdir, "runs", f"ingest-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    pipeline = Pipeline(amqp_url, run_dir, source=source,
                        api={"workers": _shipped_workers(source)}, **_open(source))
    try:
        api = pipeline.start_api()
        nginx = pipeline.start_nginx(worker_processes=2)
        ingest._warm_up(nginx.base_url + "/upload", body_path, "image/jpeg")
        meter = auth._CpuMeter(api.process.pid, nginx.process.pid)
        meter.start()
        accepted, refused, duration, p50, p90, p99, worst = auth._load(
            nginx.base_url, "/upload", body_path, "image/jpeg", connections, seconds)
        spent = meter.stop()
        queued = pipeline.queue_depth()
    finally:
        pipeline.close()
        ingest._release_space(run_dir)
    return auth.AuthRun(
        ingest.IngestResult(design, accepted / duration, p50, p90, p99, worst, accepted,
                            refused, queued),
        {name: 1000 * cpu / max(accepted, 1) for name, cpu in spent.items()})


@contextlib.contextmanager
def _drain_tree(source):
    """endtoend.drain, run against the tree at ``source``: its pipelines
    are made here (endtoend's make the current tree's alone)."""
    made = endtoend._fresh_pipeline

    def fresh(workdir, amqp_url, broker=None):
        run_dir = os.path.join(workdir, f"e2e-{uuid.uuid4().hex[:8]}")
        os.makedirs(run_dir)
        return Pipeline(amqp_url, run_dir, source=source, api={"workers": "2"},
                        broker=broker or {}, **_open(source)), run_dir
    endtoend._fresh_pipeline = fresh
    try:
        yield
    finally:
        endtoend._fresh_pipeline = made


def drain_run(workdir, amqp_url, source, photo, jobs, workers):
    with _drain_tree(source):
        return endtoend.drain(workdir, amqp_url, photo, jobs, workers)


# -- the section ---------------------------------------------------------------------------

def run(workdir, amqp_url, photo, smoke, log=print):
    """{"erase": {store name: [EraseRun, one per round]}, "gc": {row: [GcRun]},
    "ingest": {design: [auth.AuthRun, one per round]}, "drain": {design: [jobs/s, one
    per round]}, "sizes": {...}}."""
    totals = SMOKE_TOTALS if smoke else TOTALS
    per_owner = 1000 if not smoke else 10
    runs = 3 if not smoke else 1
    results = {"sizes": {"totals": totals, "per_owner": per_owner, "runs": runs,
                         "smoke": smoke},
               "erase": {}, "gc": {}, "ingest": {}, "drain": {}}
    events = Events(amqp_url)
    stores = []
    with contextlib.ExitStack() as cleanup:
        place, results["sizes"]["filesystem"] = cleanup.enter_context(filesystem(workdir, log))
        cleanup.callback(events.close)
        for total in totals:
            log(f"  a store of {total:,} jobs")
            stores.append(make_store(workdir, place, amqp_url, total, per_owner, runs, runs,
                                     log))
            cleanup.callback(stores[-1].pipeline.close)
        for store in stores:                # the API's first erasure, not timed
            erase_owner(store, "bench-warm-up", events)
        # erasure by owner, the stores in turn (the order swapped each round)
        for round_ in range(runs):
            for store in (stores if round_ % 2 else stores[::-1]):
                found = erase_owner(store, store.owners[round_], events)
                results["erase"].setdefault(store_name(store.total), []).append(found)
                log(f"  erase an owner's {found.erased:,} jobs among {found.stored:,} stored: "
                    f"{found.seconds:.2f} s, {found.erased / found.seconds:.0f} jobs/s, "
                    f"{found.events:,} job.deleted")
        # gc: each round, a run with nothing new expired since the last one,
        # then a day later, 1% expired
        for round_ in range(runs):
            for store in (stores if round_ % 2 else stores[::-1]):
                for label, at in ((f"{store_name(store.total)}, 0 expired",
                                   store.now + round_ * DAY),
                                  (f"{store_name(store.total)}, 1% ({store.expired:,}) expired",
                                   store.now + (round_ + 1) * DAY)):
                    found = gc(store, at, events)
                    results["gc"].setdefault(label, []).append(found)
                    log(f"  gc, {found.stored:,} stored, {label.split(', ', 1)[1]}: "
                        f"{found.originals:,} originals removed, {found.erased:,} failed jobs "
                        f"erased, {found.read:,} index entries read, {found.seconds:.3f} s")

    # ingest and drain: the trees interleaved, run after run
    raw_path, _, _ = ingest.write_bodies(workdir, photo)
    trees = []
    for commit in (BEFORE, JUST_BEFORE):
        tree, why_not = ingest.export_tree(commit, workdir)
        if tree is None:
            log(f"  not measuring imgworker {commit[:7]}: {why_not}")
        else:
            trees.append((TREES[commit], _runnable(tree)))
    trees.append((NOW, REPO))
    connections, seconds = (4, 1) if smoke else (32, 5)
    repetitions, warmup = (1, 0) if smoke else (3, 1)
    drained = 4 if smoke else 300
    for repetition in range(warmup + repetitions):
        for design, source in trees:
            found = ingest_run(workdir, amqp_url, design, source, raw_path, connections, seconds)
            if repetition >= warmup:
                results["ingest"].setdefault(design, []).append(found)
                result = found.result
                log(f"  ingest, {design}: {result.accepted_per_second:.0f} accepted/s, "
                    f"p99 {result.p99_ms:.1f} ms, {result.refused} refused, "
                    f"{result.queued}/{result.accepted} queued; CPU ms per upload: "
                    + ", ".join(f"{name} {ms:.2f}" for name, ms in found.cpu_ms.items()))
        for design, source in trees:
            if repetition < warmup:
                continue
            rate = drain_run(workdir, amqp_url, source, photo, drained, 2)
            results["drain"].setdefault(design, []).append(rate)
            log(f"  drain, {design}: {rate:.1f} jobs/s with 2 workers")
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)
    return results


def median(values):
    return statistics.median(values)
