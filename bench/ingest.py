"""Ingest: 495 KB uploads through nginx (the shipped site), each fsynced and
confirmed by RabbitMQ before its 202, driven by wrk on the same 2 cores.

Designs, measured one after the other in one run:
- the straightforward design (bench/baseline_api.py: multipart, sync
  workers, one confirmed publish per request): the baseline;
- imgworker's API with a multipart upload;
- imgworker's API with a raw-body upload (Content-Type: image/jpeg): with
  one thread per process, as shipped, and at lower concurrency;
- a diagnostic that is not durable: the same with fsync() made a no-op by
  eatmydata, to show how much of the cost is the disk's.
After each run the queue must hold at least one message per 202 counted (a
few more: requests in flight when wrk stops are queued but not counted).
"""

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass

from harness.pipeline import REPO, Pipeline, wait_for_port

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
    queued: int            # messages in the queue afterwards


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


def _baseline_server(pipeline):
    """gunicorn running bench/baseline_api.py where the API would listen."""
    spec = (f"bench.baseline_api:app({pipeline.root + '/originals'!r}, "
            f"{pipeline.amqp_url!r}, {pipeline.queue!r})")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{pipeline.port}",
         "--log-level", "warning", spec], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(pipeline.port, process, "the baseline API")
    except AssertionError:
        process.kill()
        raise
    return process


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
            api=None, env=None, broker=None):
    """One wrk run against a fresh pipeline: ``server`` is "baseline" or
    "imgworker"; ``api`` and ``broker`` are config options; an IngestResult.
    The run's files stay (emptied) below ``workdir``/runs."""
    run_dir = os.path.join(workdir, "runs", f"ingest-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    pipeline = Pipeline(amqp_url, run_dir, api={"workers": "2", **(api or {})},
                        broker=broker or {})
    baseline = None
    try:
        if server == "baseline":
            baseline = _baseline_server(pipeline)
        else:
            pipeline.start_api(env=env or {})
        nginx = pipeline.start_nginx(worker_processes=2)
        accepted, refused, duration, p50, p90, p99, worst = wrk(
            nginx.base_url + "/upload", body, content_type, clients, seconds)
        queued = pipeline.queue_depth()
    finally:
        if baseline is not None:
            baseline.terminate()
            baseline.wait()
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


def run(workdir, amqp_url, photo, connections, seconds, repetitions, log=print):
    """{design: [IngestResult per repetition]}"""
    raw_path, form_path, form_type = write_bodies(workdir, photo)
    eatmydata = {"LD_PRELOAD": "libeatmydata.so"}
    designs = (
        # label, server, body, content type, [api] options, API environment, connections
        ("straightforward design (baseline), multipart", "baseline", form_path, form_type,
         {}, {}, connections),
        ("imgworker API, multipart", "imgworker", form_path, form_type, {}, {}, connections),
        ("imgworker API, raw body, 1 thread per process", "imgworker", raw_path, "image/jpeg",
         {"threads": "1"}, {}, connections),
        ("imgworker API, raw body (as shipped: 16 threads)", "imgworker", raw_path, "image/jpeg",
         {}, {}, connections),
        (f"imgworker API, raw body, {max(1, connections // 8)} connections", "imgworker",
         raw_path, "image/jpeg", {}, {}, max(1, connections // 8)),
        ("diagnostic, not durable: raw body with fsync() a no-op (eatmydata)", "imgworker",
         raw_path, "image/jpeg", {}, eatmydata, connections),
    )
    results = {}
    for design, server, body, content_type, options, env, clients in designs:
        results[design] = []
        for repetition in range(repetitions + 1):          # the first is the warm-up
            result = measure(workdir, amqp_url, design, server, body, content_type, clients,
                             seconds, api=options, env=env)
            if repetition == 0:
                continue
            results[design].append(result)
            log(f"  {design}: {result.accepted_per_second:.0f} accepted/s, "
                f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
                f"{result.refused} refused, {result.queued}/{result.accepted} in the queue")
    return results
