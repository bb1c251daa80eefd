"""Auth (issue 23): what credentials cost ingest. The same 495 KB raw-body
uploads through nginx (the shipped site, its rate limits lifted as in the
tests), driven by bench/load.py on the same cores, interleaved run after
run:

- imgworker before issue 23 (commit BEFORE, exported from git and run with
  its own nginx site): no auth_request at all;
- auth off ([auth] required = false): nginx still asks the API's
  /auth/upload before each upload, which lets it through;
- auth on, every upload with the same API key (Authorization: Bearer);
- auth on, every upload with a grant of its own, minted before the run
  (excluded from the timing) and spent by its upload (Authorization:
  Bearer imgwg_...).

The client is bench/load.py, not wrk, in all four: it sends each
request's own head and the same body buffer with no copy, so a grant per
request costs it what a constant key does (wrk, formatting each request in
Lua, spent 1 ms more per request on one with a grant of its own). Beside
each rate: the CPU each process group spent per accepted upload (API
processes, nginx, RabbitMQ, the client; /proc), which says where a
difference goes. POST /grants is measured on its own (grants made per
second through nginx, with a key). With py-spy installed, the API
processes are sampled during one more run of each design (not timed), the
samples of the thread holding the GIL split by what the API was doing.
"""

import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import requests

from harness.pipeline import REPO, Pipeline, children
from imgworker import config

from . import ingest

#: imgworker just before issue 23: the ingest path with no auth_request.
BEFORE = "9f92ffd205c96ffde039cf5b918ff42c850051a1"

OFF = "auth off (required = false)"
KEY = "auth on, an API key"
GRANT = "auth on, a fresh grant per upload"


@dataclass
class AuthRun:
    """One run: its IngestResult, and CPU ms per accepted upload by
    process group."""
    result: ingest.IngestResult
    cpu_ms: dict = field(default_factory=dict)


def _load(base_url, path, body_path, content_type, connections, seconds, key="", grants=""):
    """bench/load.py at ``connections`` for ``seconds``: (accepted,
    refused, seconds, p50, p90, p99, max ms), as ingest.wrk answers."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", base_url, path, body_path, content_type,
         str(connections), str(seconds), "--key", key, "--grants", grants],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    fields = re.search(r"^RESULT (.*)$", out, re.M).group(1).split()
    count, duration_us, connect, read, write, status, timeout = map(int, fields[:7])
    p50, p90, p99, worst = (float(v) / 1000 for v in fields[7:])
    return count - status, connect + read + write + status + timeout, duration_us / 1e6, \
        p50, p90, p99, worst


# -- CPU by process group -----------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid):
    pids, pending = [], [pid]
    while pending:
        pid = pending.pop()
        pids.append(pid)
        pending += children(pid)
    return pids


def _ticks(pids):
    """{pid: utime + stime} of those still running."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            found[pid] = int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def _spent(before, after):
    """Ticks spent between two _ticks() by the processes in both (a pid
    gone meanwhile, such as another RabbitMQ node stopping, counts for
    nothing rather than for less than nothing)."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys()
               if after[pid] >= before[pid])


def _rabbitmq_pids():
    """The RabbitMQ nodes' Erlang VMs ("-s rabbit boot"), not rabbitmqctl's."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        if words[0].endswith(b"/beam.smp") and b"boot" in words and b"rabbit" in words:
            found.append(int(cmdline.split("/")[2]))
    return found


def _machine_busy():
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)      # less idle, iowait


class _CpuMeter:
    """CPU seconds spent by the API's processes, nginx's, RabbitMQ's and
    the client (this process's reaped children) between start() and stop()."""

    def __init__(self, api_pid, nginx_pid):
        self._pids = api_pid, nginx_pid

    def start(self):
        # the processes as they are now: nginx's workers are up by the
        # time the load starts, not always when its port is
        api_pid, nginx_pid = self._pids
        self.groups = {"API": _tree(api_pid), "nginx": _tree(nginx_pid),
                       "RabbitMQ": _rabbitmq_pids()}
        self._before = {name: _ticks(pids) for name, pids in self.groups.items()}
        self._client = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._busy = _machine_busy()

    def stop(self):
        spent = {name: _spent(self._before[name], _ticks(pids)) / _TICK
                 for name, pids in self.groups.items()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent["client"] = (usage.ru_utime + usage.ru_stime - self._client.ru_utime
                        - self._client.ru_stime)
        busy, total = _machine_busy()
        spent["machine, all busy"] = (busy - self._busy[0]) / _TICK
        return spent


# -- grants minted ahead of a run -----------------------------------------------------

def mint(pipeline, count, log=print):
    """``count`` grants for this pipeline, made before the run that spends
    them: in this process with the API's own code (imgworker.auth) when it
    has it, else through POST /grants straight to the API."""
    keys = pipeline.add_key(f"minter-{uuid.uuid4().hex[:6]}", "grant")
    try:
        from imgworker import auth
        keeper = auth.Gatekeeper(config.load(pipeline.config_path))
        return [keeper.issue("bench")["grant"] for _ in range(count)]
    except (ImportError, AttributeError, TypeError) as error:
        log(f"  minting through POST /grants ({error!r})")
    made = []
    with requests.Session() as session:
        while len(made) < count:
            response = session.post(pipeline.base_url + "/grants", json={"owner": "bench"},
                                    headers={"Authorization": f"Bearer {keys}"}, timeout=10)
            response.raise_for_status()
            made.append(response.json()["grant"])
    return made


# -- one run ------------------------------------------------------------------------

def measure(workdir, amqp_url, design, body_path, connections, seconds, source=REPO,
            profile=None, log=print):
    """One run of ``design`` against a fresh pipeline (and its nginx):
    an AuthRun. With ``profile`` (a py-spy path), the API processes are
    sampled during the run instead, and the run's figures are not kept:
    returns {"samples": how many, "shares": {activity: share of samples}}."""
    run_dir = os.path.join(workdir, "runs", f"auth-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    workers = str(config.load(os.devnull).api.workers) if source == REPO else "2"
    sections = {"api": {"workers": workers}}
    if source == REPO:
        sections["auth"] = {"required": "false" if design == OFF else "true"}
    pipeline = Pipeline(amqp_url, run_dir, source=source, **sections)
    try:
        key = grants = ""
        warm_up = {}
        if design == KEY:
            key = pipeline.add_key("bench", "upload")
            warm_up = {"Authorization": f"Bearer {key}"}
        elif design == GRANT:
            grants = os.path.join(run_dir, "grants.txt")
            # more than the fastest run could spend; a grant short of that
            # is refused, and shows as refused. The first: the warm-up's.
            first, *rest = mint(pipeline, 2000 * seconds + 201, log)
            warm_up = {"Authorization": f"Bearer {first}"}
            with open(grants, "w") as handle:
                handle.writelines(token + "\n" for token in rest)
        api = pipeline.start_api()
        nginx = pipeline.start_nginx(worker_processes=2)
        ingest._warm_up(nginx.base_url + "/upload", body_path, "image/jpeg", warm_up)
        meter = _CpuMeter(api.process.pid, nginx.process.pid)
        spy = _spy_on(profile, api.process.pid, seconds, run_dir) if profile else None
        meter.start()
        accepted, refused, duration, p50, p90, p99, worst = _load(
            nginx.base_url, "/upload", body_path, "image/jpeg", connections, seconds, key,
            grants)
        spent = meter.stop()
        queued = pipeline.queue_depth()
        if spy:
            return _spied(spy)
    finally:
        pipeline.close()
        ingest._release_space(run_dir)
    result = ingest.IngestResult(design, accepted / duration, p50, p90, p99, worst, accepted,
                                 refused, queued)
    return AuthRun(result, {name: 1000 * seconds / max(accepted, 1)
                            for name, seconds in spent.items()})


def grants_per_second(workdir, amqp_url, connections, seconds):
    """POST /grants through nginx with a key, bench/load.py at ``connections``:
    (grants made per second, refused, p50 ms, p99 ms)."""
    run_dir = os.path.join(workdir, "runs", f"grants-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    pipeline = Pipeline(amqp_url, run_dir, api={"workers": str(config.load(os.devnull)
                                                              .api.workers)},
                        auth={"required": "true"})
    try:
        key = pipeline.add_key("backend", "grant")
        body = os.path.join(run_dir, "grant.json")
        with open(body, "w") as handle:
            json.dump({"owner": "bench", "ttl": 60}, handle)
        pipeline.start_api()
        nginx = pipeline.start_nginx(worker_processes=2)
        made, refused, duration, p50, _p90, p99, _worst = _load(
            nginx.base_url, "/grants", body, "application/json", connections, seconds, key)
    finally:
        pipeline.close()
    return made / duration, refused, p50, p99


# -- py-spy ---------------------------------------------------------------------------

def py_spy():
    """The py-spy command, or None: PATH, then script/bench's venv and a
    venv of its own in /var/tmp."""
    for candidate in (shutil.which("py-spy"), "/var/tmp/imgworker-bench-venv/bin/py-spy",
                      "/var/tmp/pyspy-venv/bin/py-spy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _spy_on(command, api_pid, seconds, run_dir):
    """py-spy recording each API worker process for the run's seconds."""
    spies = []
    for pid in children(api_pid) or [api_pid]:
        out = os.path.join(run_dir, f"spy-{pid}.txt")
        spies.append((out, subprocess.Popen(
            [command, "record", "--pid", str(pid), "--duration", str(seconds + 1),
             "--rate", "250", "--format", "raw", "--nonblocking", "--gil", "--output", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(0.5)        # py-spy attached before the load starts
    return spies


#: (activity, a pattern one of a sample's frames matches), the first that
#: matches names the sample: the stack's deepest imgworker frames decide.
_ACTIVITIES = (
    ("credentials checked (imgworker/auth.py)", re.compile(r"imgworker/auth\.py")),
    ("body read from the socket", re.compile(r"^_read_from_socket |^_read_length ")),
    ("identify (header walk)", re.compile(r"imgworker/images\.py")),
    ("store and fsync (storage.py)", re.compile(r"imgworker/storage\.py")),
    ("publish and confirm (broker.py)", re.compile(r"imgworker/broker\.py")),
    ("metrics", re.compile(r"imgworker/metrics\.py|prometheus_client")),
    ("pika (the broker connection's I/O)", re.compile(r"pika/")),
)
_ROUTE = re.compile(r"(?:^|\.)_route \(.*imgworker/api\.py")


def _spied(spies):
    """{"samples": N, "shares": {activity: share of the API's samples}}
    (py-spy --gil: the thread
    holding the GIL, i.e. running Python): each sample named by the
    first of _ACTIVITIES it matches, else by the API handler it is in
    (api.py's function called from _route), else by gunicorn (HTTP
    parsing, socket, the thread pool), else "other"."""
    counts = Counter()
    for out, process in spies:
        process.wait(60)
        try:
            with open(out) as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            for activity, pattern in _ACTIVITIES:
                if any(pattern.search(frame) for frame in frames):
                    break
            else:
                handler = next((frames[i + 1].split(" (")[0].rpartition(".")[2]
                                for i, frame in enumerate(frames[:-1]) if _ROUTE.search(frame)),
                               None)
                if handler:
                    activity = f"API handler {handler}(), the rest"
                elif any("imgworker/api.py" in frame for frame in frames):
                    activity = "API, around the handlers (__call__, _respond)"
                elif any("gunicorn" in frame for frame in frames):
                    activity = "gunicorn (HTTP parsing, sockets, threads)"
                else:
                    activity = "other"
            counts[activity] += int(count)
    total = sum(counts.values())
    return {"samples": total,
            "shares": {activity: count / (total or 1) for activity, count in counts.most_common()}}


# -- the section ------------------------------------------------------------------------

def run(workdir, amqp_url, photo, connections, seconds, repetitions, log=print, profile=True):
    """{"designs": {design: [AuthRun]}, "grants": (per second, refused, p50,
    p99), "profile": {design: {"samples", "shares"}} or the reason there is none}."""
    raw_path, _, _ = ingest.write_bodies(workdir, photo)
    before, why_not = ingest.export_tree(BEFORE, workdir)
    designs = ([(f"imgworker {BEFORE[:7]} (before issue 23), no auth", before)] if before else [])
    if before is None:
        log(f"  not measuring imgworker {BEFORE[:7]}: {why_not}")
    designs += [(OFF, REPO), (KEY, REPO), (GRANT, REPO)]
    results = {design: [] for design, _ in designs}
    warmup = 0 if repetitions == 1 else 1
    for repetition in range(warmup + repetitions):
        for design, source in designs:      # interleaved: drift hits all alike
            run = measure(workdir, amqp_url, design, raw_path, connections, seconds, source,
                          log=log)
            if repetition < warmup:
                continue
            results[design].append(run)
            r = run.result
            log(f"  {design}: {r.accepted_per_second:.0f} accepted/s, p50 {r.p50_ms:.1f} ms, "
                f"p99 {r.p99_ms:.1f} ms, {r.refused} refused, {r.queued}/{r.accepted} queued; "
                "CPU ms per upload: " + ", ".join(f"{name} {ms:.2f}"
                                                   for name, ms in run.cpu_ms.items()))
    made = grants_per_second(workdir, amqp_url, connections, seconds)
    log(f"  POST /grants through nginx: {made[0]:.0f} grants/s, {made[1]} refused, "
        f"p50 {made[2]:.1f} ms, p99 {made[3]:.1f} ms")
    spy = py_spy() if profile else None
    if spy:
        profiles = {}
        for design, source in designs:
            profiles[design] = measure(workdir, amqp_url, design, raw_path, connections,
                                       seconds, source, profile=spy, log=log)
            log(f"  py-spy, {design}, {profiles[design]['samples']} samples: " + ", ".join(
                f"{activity} {share:.1%}" for activity, share in profiles[design]["shares"].items()))
    else:
        profiles = ("not asked for" if not profile else
                    "py-spy is not installed (pip install py-spy, into a venv)")
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)
    return {"designs": results, "grants": made, "profile": profiles}


def median_rate(runs):
    return ingest.median_rate([run.result for run in runs])


if __name__ == "__main__":       # python3 -m bench.auth: this section alone, printed
    import tempfile
    from harness.pipeline import AMQP_URL
    from . import inputs
    with tempfile.TemporaryDirectory(prefix="imgworker-bench-", dir="/var/tmp") as scratch:
        run(scratch, AMQP_URL, inputs.upload(False), 32, 5, 3)
    sys.exit(0)
