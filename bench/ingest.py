"""Ingest: 495 KB uploads through nginx (the shipped site), each durable
and confirmed by RabbitMQ before its 202, driven by wrk on the same 2 cores.

Designs, measured one after the other in one run, raw bodies and multipart:
- the straightforward design (bench/baseline_api.py: multipart, sync
  workers, one confirmed publish per request): the baseline;
- the ceiling (bench/ceiling_api.py: the body read and a 202, nothing
  stored or queued): what nginx, gunicorn and wrk leave on these cores;
- imgworker as it was before issue 14 (commit BEFORE, exported from git and
  run with its own nginx site): what the current path is measured against;
- imgworker's API as it is, at full load and at the load that gives 90% of
  its peak, where its p99 is judged.
After each run the queue must hold at least one message per 202 counted (a
few more: requests in flight when wrk stops are queued but not counted).
"""

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import requests

from harness.pipeline import REPO, Pipeline, wait_for_port
from imgworker import config

_WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %.0f %.0f %.0f %.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class IngestResult:
    design: str
    accepted_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    accepted: int
    refused: int
    queued: int            # messages in the queue afterwards (None: the ceiling queues nothing)


def multipart(data, boundary="imgworker-bench-boundary"):
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"photo.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wrk(url, body_path, content_type, connections, seconds):
    script = os.path.join(os.path.dirname(body_path), "post.lua")
    with open(script, "w") as handle:
        handle.write(_WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", script, url],
        env={**os.environ, "BENCH_BODY": body_path, "BENCH_CONTENT_TYPE": content_type},
        capture_output=True, text=True, check=True).stdout
    fields = re.search(r"^RESULT (.*)$", out, re.M).group(1).split()
    requests, duration_us, connect, read, write, status, timeout = map(int, fields[:7])
    p50, p90, p99, worst = (float(v) / 1000 for v in fields[7:])
    failed = connect + read + write + status + timeout
    return requests - failed, failed, duration_us / 1e6, p50, p90, p99, worst


def _stand_in(pipeline, server):
    """gunicorn running a stand-in for the API where the API would listen:
    bench/baseline_api.py (sync workers, as its design has them), or
    bench/ceiling_api.py with the shipped API's processes, threads and
    environment."""
    if server == "baseline":
        options, env = ["-w", "2"], {}
        app = (f"bench.baseline_api:app({pipeline.root + '/originals'!r}, "
               f"{pipeline.amqp_url!r}, {pipeline.queue!r})")
    else:
        shipped = config.load(os.devnull).api
        options = ["-k", "gthread", "-w", str(shipped.workers), "--threads", str(shipped.threads)]
        env, app = pipeline.api_environment(), "bench.ceiling_api:app()"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", *options, "-b", f"127.0.0.1:{pipeline.port}",
         "--log-level", "warning", app],
        cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        wait_for_port(pipeline.port, process, f"the {server} API")
    except AssertionError:
        process.kill()
        raise
    return process


def _warm_up(url, body_path, content_type, headers=None, timeout=60):
    """One upload through nginx, answered, before wrk starts: on a busy
    machine an API's (or a stand-in's) workers took seconds to import
    after its port or READY=1, longer than a smoke run's 1 s of load,
    which then counted nothing. (It is queued: one more than wrk counts.)"""
    with open(body_path, "rb") as handle:
        data = handle.read()
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.post(url, data=data, timeout=timeout,
                          headers={"Content-Type": content_type, **(headers or {})})
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _release_space(run_dir):
    """Free a finished run's disk space but keep its files: on ext4 without
    a journal (this machine's) every file created scans past the inodes
    freed in the last minutes, so deleting a run's thousands of files made
    the next design's uploads slower by a varying amount (perf: up to a
    fifth of all CPU in ext4's recently_deleted()). Truncated files keep
    their inodes; run() deletes the runs when all are measured."""
    for directory, _dirs, files in os.walk(run_dir):
        for name in files:
            try:
                os.truncate(os.path.join(directory, name), 0)
            except OSError:
                pass


def measure(workdir, amqp_url, design, server, body, content_type, clients, seconds,
            api=None, env=None, broker=None, source=REPO):
    """One wrk run against a fresh pipeline: ``server`` is "baseline",
    "ceiling" or "imgworker"; ``api`` and ``broker`` are config options; an
    IngestResult.
    The run's files stay (emptied) below ``workdir``/runs."""
    run_dir = os.path.join(workdir, "runs", f"ingest-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    # Each tree's shipped [api] workers (BEFORE shipped 2), not the test pipelines' 1
    workers = str(config.load(os.devnull).api.workers) if source == REPO else "2"
    pipeline = Pipeline(amqp_url, run_dir, source=source,
                        api={"workers": workers, **(api or {})}, broker=broker or {})
    stand_in = None
    try:
        if server in ("baseline", "ceiling"):
            stand_in = _stand_in(pipeline, server)
        else:
            pipeline.start_api(env=env or {})
        nginx = pipeline.start_nginx(worker_processes=2)
        _warm_up(nginx.base_url + "/upload", body, content_type)
        accepted, refused, duration, p50, p90, p99, worst = wrk(
            nginx.base_url + "/upload", body, content_type, clients, seconds)
        queued = None if server == "ceiling" else pipeline.queue_depth()
    finally:
        if stand_in is not None:
            stand_in.terminate()
            stand_in.wait()
        pipeline.close()
        _release_space(run_dir)
    return IngestResult(design, accepted / duration, p50, p90, p99, worst, accepted, refused,
                        queued)


def write_bodies(workdir, photo):
    """(raw body path, multipart body path, multipart content type)"""
    body_dir = os.path.join(workdir, "bodies")
    os.makedirs(body_dir, exist_ok=True)
    raw_path = os.path.join(body_dir, "photo.jpg")
    with open(raw_path, "wb") as handle:
        handle.write(photo)
    form, form_type = multipart(photo)
    form_path = os.path.join(body_dir, "form")
    with open(form_path, "wb") as handle:
        handle.write(form)
    return raw_path, form_path, form_type


#: The ceiling's design name (the report puts imgworker's rate against it).
CEILING = "ceiling: the body read, then 202 (nothing stored or queued), raw body"

#: imgworker as it was before the ingest work of issue 14 ("today's path" in
#: its text): its API and its nginx site run beside the current ones.
BEFORE = "b0a0c31dcaac7fe2da4cb581ca3df683f50a78ef"


def export_tree(commit, workdir):
    """The repository's tree at ``commit``, written below workdir (None,
    with the reason logged, outside a git checkout)."""
    target = os.path.join(workdir, f"tree-{commit[:7]}")
    os.makedirs(target, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit], capture_output=True)
    if archive.returncode != 0:
        return None, archive.stderr.decode(errors="replace").strip()
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target, None


def run(workdir, amqp_url, photo, connections, seconds, repetitions, log=print):
    """{design: [IngestResult per repetition]}: each design at ``connections``,
    then the current API at fewer connections, down to the load that still
    gives 90% of its peak (where its p99 is judged)."""
    raw_path, form_path, form_type = write_bodies(workdir, photo)
    before, why_not = export_tree(BEFORE, workdir)
    if before is None:
        log(f"  not measuring imgworker {BEFORE[:7]}: {why_not}")
    short = BEFORE[:7]
    designs = [
        # label, server, source tree, body, content type
        # the baseline keeps the nginx site it was first measured with
        ("straightforward design (baseline), multipart", "baseline", before or REPO, form_path,
         form_type),
        (CEILING, "ceiling", REPO, raw_path, "image/jpeg"),
        *([(f"imgworker {short} (before), raw body", "imgworker", before, raw_path, "image/jpeg"),
           (f"imgworker {short} (before), multipart", "imgworker", before, form_path, form_type)]
          if before else []),
        ("imgworker API, raw body", "imgworker", REPO, raw_path, "image/jpeg"),
        ("imgworker API, multipart", "imgworker", REPO, form_path, form_type),
    ]
    results = {}

    def measure_design(design, server, source, body, content_type, clients, runs, warmup):
        results[design] = []
        for repetition in range(runs + warmup):
            result = measure(workdir, amqp_url, design, server, body, content_type, clients,
                             seconds, source=source)
            if repetition < warmup:
                continue
            results[design].append(result)
            queued = "nothing queued" if result.queued is None else \
                f"{result.queued}/{result.accepted} in the queue"
            log(f"  {design}: {result.accepted_per_second:.0f} accepted/s, "
                f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                f"{result.refused} refused, {queued}")
        return median_rate(results[design])

    peaks = {}
    for design, server, source, body, content_type in designs:
        peaks[design] = measure_design(design, server, source, body, content_type,
                                       connections, repetitions, 1)
    for design, server, source, body, content_type in designs[-2:]:
        for clients in (c for c in (4, 8, 16, 24) if c < connections):
            rate = measure_design(f"{design}, {clients} connections", server, source, body,
                                  content_type, clients, repetitions, 0)
            if rate >= 0.9 * peaks[design]:
                break
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)
    return results


def median_rate(runs):
    return sorted(r.accepted_per_second for r in runs)[len(runs) // 2]
