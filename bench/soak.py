"""The soak (issue 25): imgworker at a steady 80% of its drain capacity for an
hour, watched for anything that grows, and with the operator's kit.

    python3 -m bench --only soak [--minutes M] [--smoke]     (bench/__main__.py)
    python3 -m bench.soak --minutes M [--smoke] --out DIR    (this part alone)

Setup: the shipped nginx site with its shipped rate limits, the API (the
shipped number of processes), 2 workers and the webhook sender, all with
``[auth] required = true``; a webhook receiver answering 200
(bench/soak_receiver.py); a Prometheus from Debian scraping the API's
/metrics every 5 s and evaluating the shipped rules
(monitoring/prometheus/imgworker-alerts.yml) every 5 s. Everything runs in a
RabbitMQ virtual host of its own, made for the run and deleted after it: the
webhook queue and the events exchange have fixed names, which other tests on
the same broker would otherwise share.

1. Calibrate: the queue is filled (straight to the API), then the load's mix
   is uploaded through nginx faster than the workers drain it; the capacity
   is the jobs the 2 workers end per second meanwhile, the queue never empty
   and the ingest running beside them as it does under load.
2. Load: 80% of that, open loop (bench/soak_load.py, a process of its own),
   for M minutes: 2 and 12 MP JPEGs, PNGs and WebPs; 5% undecodable or
   refused; one job in 200 whose renderer is killed (SIGKILL of the
   rendering child once it is at work, every attempt, as a decoder crash
   would); half the uploads with the key, half with a fresh grant each; 2%
   of the jobs accepted erased while queued or rendering.
3. Step: 3 minutes at 150%, one worker stopped (SIGTERM, as systemctl stop);
   the backlog alert and a worker alert must fire. Then the worker is
   started again, the backlog drains, and the ledger is checked.

Every 10 s (bench/soak_sample.py): RSS, open fds and threads of every
imgworker process by kind and of beam.smp, the queue depth, the metrics
directory's files, the storage's size, upload-to-done latency (from the
webhooks), and Prometheus's alerts. bench/soak_report.py judges the run and
writes OUT/results.md and OUT/chart.png.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import pika
import requests

from harness import samples
from harness.ledger import Ledger
from harness.pipeline import AMQP_URL, REPO, Pipeline, children, free_port, wait_until
from imgworker import config as imgworker_config
from imgworker import job as jobs

from . import inputs as bench_inputs
from .erasure import filesystem
from . import soak_report, soak_sample

RULES = os.path.join(REPO, "monitoring", "prometheus", "imgworker-alerts.yml")
WEBHOOK_SECRET = "soak-secret"


class Plan:
    """The run's timings. The issue's hour: a 5-minute warm-up, first and
    last 10-minute windows, 10 s samples. Shorter runs scale the warm-up and
    the windows with the minutes (M/20 of them under 20 minutes); the smoke
    is about 2 minutes whatever M, and measures nothing."""

    def __init__(self, minutes, smoke):
        self.minutes, self.smoke = minutes, smoke
        if smoke:
            self.main = 45.0
            self.step = 20.0
            self.warmup = 10.0
            self.window = 15.0
            self.interval = 5.0
            self.calibration = 8.0
            self.prefill_seconds = 3.0
            self.originals_kept, self.gc_every = "10s", 10.0
        else:
            scale = min(1.0, minutes / 20)
            self.main = minutes * 60.0
            self.step = 180.0
            self.warmup = 300.0 * scale
            self.window = 600.0 * scale
            self.interval = 10.0
            self.calibration = 60.0 if minutes >= 20 else 40.0
            self.prefill_seconds = 8.0
            self.originals_kept, self.gc_every = "5m", 120.0
        self.scaled = not smoke and minutes < 20


# -- the mix ---------------------------------------------------------------------

#: Per 200 uploads: (input name, how many). 10 bad (5%): 5 refused (415,
#: 422), 5 accepted that cannot be decoded; 1 renderer killer; 189 images.
MIX = (("jpeg-2mp", 80), ("webp-2mp", 40), ("png-2mp", 25), ("jpeg-12mp", 28),
       ("webp-12mp", 12), ("png-12mp", 4),
       ("refused-415", 3), ("refused-422", 2), ("truncated-jpeg", 3), ("undecodable-png", 2),
       ("poison", 1))
CONTENT_TYPES = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


def make_inputs(directory, smoke, log):
    """Writes each input of MIX to ``directory``: {name: {path, content_type}}."""
    os.makedirs(directory, exist_ok=True)
    small = (160, 120) if smoke else (1632, 1224)
    large = (400, 300) if smoke else (4000, 3000)
    started = time.monotonic()
    photo_small, photo_large = samples.photo(*small), samples.photo(*large)
    made = {
        "jpeg-2mp": bench_inputs.upload(smoke),
        "webp-2mp": samples.encode(photo_small, "WEBP", quality=80),
        "png-2mp": samples.encode(photo_small, "PNG", compress_level=1),
        "jpeg-12mp": samples.encode(photo_large, "JPEG", quality=90),
        "webp-12mp": samples.encode(photo_large, "WEBP", quality=80, method=2),
        "png-12mp": samples.encode(photo_large, "PNG", compress_level=1),
        "refused-415": b"this is not an image, whatever its name says\n" * 40,
        "refused-422": samples.png_header_only(30000, 10),
        "truncated-jpeg": samples.truncated_jpeg(),
        "undecodable-png": samples.png_header_only(800, 600),
        # 12 MP even in the smoke: its renderer must be at work long
        # enough to be killed mid-render
        "poison": (samples.encode(samples.photo(4000, 3000), "JPEG", quality=92) if smoke
                   else samples.encode(photo_large, "JPEG", quality=92)),
    }
    found = {}
    for name, data in made.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(data)
        kind = name.split("-")[0]
        found[name] = {"path": path, "bytes": len(data),
                       "content_type": CONTENT_TYPES.get(kind, "application/octet-stream")}
    log(f"  inputs made in {time.monotonic() - started:.0f} s: " +
        ", ".join(f"{name} {entry['bytes'] / 1e6:.2f} MB" for name, entry in found.items()))
    return found


def sequence(seed=25, exclude=()):
    """200 input names in a fixed shuffled order (the poison one not in the
    first 20), without ``exclude``."""
    import random
    names = [name for name, count in MIX for _ in range(count) if name not in exclude]
    rng = random.Random(seed)
    rng.shuffle(names)
    if "poison" in names and names.index("poison") < 20:
        at = names.index("poison")
        names[at], names[100] = names[100], names[at]
    return names


# -- the broker: a virtual host of the run's own --------------------------------

class Vhost:
    def __init__(self, amqp_url, log):
        self.name = None
        self.url = amqp_url
        parts = urllib.parse.urlsplit(amqp_url)
        user = urllib.parse.unquote(parts.username or "guest")
        name = f"imgworker-soak-{uuid.uuid4().hex[:8]}"
        try:
            for command in (["add_vhost", name],
                            ["set_permissions", "-p", name, user, ".*", ".*", ".*"]):
                subprocess.run(["rabbitmqctl", "-q", *command], check=True, capture_output=True,
                               timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            log(f"  no virtual host of its own ({error}): webhooks share the broker's "
                "imgworker.webhooks queue with whatever else runs on it")
            self.note = f"the broker's default virtual host (rabbitmqctl failed: {error})"
            return
        self.name = name
        self.url = urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name,
                                                                                        safe="")))
        self.note = f"a virtual host of its own, {name}, deleted after the run"

    def delete(self):
        if self.name:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True,
                           timeout=120)


# -- Prometheus ---------------------------------------------------------------------

class Prometheus:
    """Debian's /usr/bin/prometheus on 127.0.0.1, its storage in the run's
    directory, scraping the API every 5 s and evaluating the shipped rules
    (the file itself, unmodified) every 5 s."""

    def __init__(self, workdir, target, log):
        self.dir = os.path.join(workdir, "prometheus")
        os.makedirs(os.path.join(self.dir, "data"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        configuration = {
            "global": {"scrape_interval": "5s", "evaluation_interval": "5s",
                       "scrape_timeout": "4s"},
            "rule_files": [RULES],
            "scrape_configs": [{"job_name": "imgworker",
                                "static_configs": [{"targets": [target]}]}],
        }
        path = os.path.join(self.dir, "prometheus.yml")
        with open(path, "w") as handle:
            json.dump(configuration, handle)         # JSON is YAML
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.log_path = os.path.join(self.dir, "prometheus.log")
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={path}", f"--storage.tsdb.path={self.dir}/data",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d"], stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._ready, "Prometheus to be ready", timeout=60, interval=0.5)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True)
        self.version = (version.stdout + version.stderr).splitlines()[0]
        log(f"  {self.version} on {self.url}, rules {os.path.relpath(RULES, REPO)}")

    def _ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n"
                                 + open(self.log_path, errors="replace").read()[-3000:])
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def alerts(self):
        """Prometheus's alerts now: [{name, labels, state, activeAt, value}]."""
        try:
            answer = requests.get(self.url + "/api/v1/alerts", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None
        return [{"name": alert["labels"].get("alertname"),
                 "labels": {k: v for k, v in alert["labels"].items()
                            if k not in ("alertname", "severity", "instance", "job")},
                 "state": alert["state"], "activeAt": alert.get("activeAt"),
                 "value": alert.get("value")} for alert in answer["data"]["alerts"]]

    def history(self, start, end):
        """ALERTS over the run at 5 s steps: [{name, labels, state, times}]."""
        try:
            answer = requests.get(self.url + "/api/v1/query_range", timeout=30, params={
                "query": "ALERTS", "start": start, "end": end, "step": "5s"}).json()
        except (requests.RequestException, ValueError):
            return []
        found = []
        for series in answer.get("data", {}).get("result", []):
            labels = series["metric"]
            found.append({"name": labels.get("alertname"), "state": labels.get("alertstate"),
                          "labels": {k: v for k, v in labels.items() if k not in (
                              "alertname", "alertstate", "severity", "instance", "job",
                              "__name__")},
                          "times": [float(t) for t, _v in series["values"]]})
        return found

    def query(self, expression):
        try:
            answer = requests.get(self.url + "/api/v1/query", params={"query": expression},
                                  timeout=10).json()
            return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]
        except (requests.RequestException, ValueError, KeyError):
            return []

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the renderer killer -----------------------------------------------------------

def _cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError):
        return None


def renderer_of(pid):
    """The worker's rendering child (spawned: its command line says so)."""
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"spawn_main" in handle.read():
                    return child
        except OSError:
            pass
    return None


class RendererKiller(threading.Thread):
    """Plays a decoder that crashes on one input: for every job of the
    "poison" input (read from the load's uploads.jsonl), each attempt, once
    the job is processing and its worker's renderer has used CPU since (it
    is at work on it), SIGKILLs the renderer. The worker replaces it; the
    attempt is lost; after max_attempts the job fails."""

    def __init__(self, soak):
        super().__init__(daemon=True)
        self.soak = soak
        self.kills = []          # (time, renderer pid, job id, attempt, worker)
        self.stopping = threading.Event()

    def run(self):
        path = os.path.join(self.soak.load_dir, "uploads.jsonl")
        position, poison, killed, watching = 0, set(), {}, {}
        while not self.stopping.is_set():
            if os.path.exists(path):
                with open(path) as handle:
                    handle.seek(position)
                    for line in handle:
                        if not line.endswith("\n"):
                            break
                        position += len(line.encode())
                        entry = json.loads(line)
                        if entry["input"] == "poison" and entry["id"]:
                            poison.add(entry["id"])
            for job_id in list(poison):
                job = jobs.read(self.soak.pipeline.root, job_id)
                if job is None or job.state.finished:     # ended, or erased
                    poison.discard(job_id)
                    continue
                if job.state is not jobs.State.PROCESSING or job.attempts <= killed.get(job_id, 0):
                    watching.pop(job_id, None)
                    continue
                worker = self.soak.workers.get(str(job.worker))
                if worker is None or worker.process.poll() is not None:
                    continue
                renderer = renderer_of(worker.process.pid)
                if renderer is None:
                    continue
                ticks = _cpu_ticks(renderer)
                seen = watching.get(job_id)
                if seen is None or seen[0] != (renderer, job.attempts):
                    watching[job_id] = ((renderer, job.attempts), ticks)
                    continue
                if ticks is not None and seen[1] is not None and ticks >= seen[1] + 3:
                    try:
                        os.kill(renderer, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed[job_id] = job.attempts
                    watching.pop(job_id, None)
                    self.kills.append((time.time(), renderer, job_id, job.attempts, job.worker))
            self.stopping.wait(0.03)


class Retention(threading.Thread):
    """``imgworker gc`` every ``plan.gc_every`` seconds, as imgworker-gc.timer
    runs it every hour, with [retention] originals of ``plan.originals_kept``.
    At 80% of a 2-worker machine's capacity the originals alone are some
    1.5 GB a minute: kept for the hour they would fill the disk, as they
    would a production machine's without its retention. So the soak keeps
    what an operator keeps -- the renditions and records -- and proves the
    gc's removals under load lose nothing (the ledger reads every done job's
    renditions at the end)."""

    DONE = re.compile(r"gc done: (\d+) originals removed, (\d+) jobs erased "
                      r"\((\d+) index entries read\)")

    def __init__(self, soak):
        super().__init__(daemon=True)
        self.soak = soak
        self.runs = []           # (start, seconds, originals removed, entries read, exit code)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.soak.plan.gc_every):
            started = time.time()
            answer = self.soak.pipeline.cli("gc", check=False)
            done = self.DONE.search(answer.stderr + answer.stdout)
            removed, read = (int(done[1]), int(done[3])) if done else (None, None)
            self.runs.append((started, time.time() - started, removed, read, answer.returncode))
            if answer.returncode != 0 or done is None:
                self.soak.notes.append(f"imgworker gc exited {answer.returncode}: "
                                       f"{(answer.stderr or answer.stdout).strip()[-300:]}")


# -- the run ------------------------------------------------------------------------

class Soak:
    def __init__(self, workdir, plan, log, stores=None):
        """``stores``: (directory, what it is) for the storage root, or None
        for one below ``workdir``."""
        self.workdir, self.plan, self.log = workdir, plan, log
        self.stores = stores
        self.load_dir = os.path.join(workdir, "load")
        os.makedirs(self.load_dir)
        self.marks = {}             # name -> unix time
        self.notes = []
        self.workers = {}           # instance -> Service
        self.load_process = None
        self.receiver = self.prometheus = self.pipeline = self.vhost = None
        self.next_upload = 0

    # -- setup ----------------------------------------------------------------------
    def setup(self, amqp_url):
        log = self.log
        self.storage_size = soak_sample.StorageSize(self.stores[0] if self.stores else None)
        self.vhost = Vhost(amqp_url, log)
        self.receiver_log = os.path.join(self.load_dir, "webhooks.log")
        port_file = os.path.join(self.load_dir, "receiver.port")
        self.receiver = subprocess.Popen([sys.executable, "-m", "bench.soak_receiver", port_file,
                                          self.receiver_log], cwd=REPO)
        wait_until(lambda: os.path.exists(port_file), "the webhook receiver", timeout=30)
        with open(port_file) as handle:
            receiver_url = f"http://127.0.0.1:{handle.read().strip()}/hooks/imgworker"
        shipped = imgworker_config.load(os.devnull)
        self.api_workers = shipped.api.workers
        self.pipeline = Pipeline(
            self.vhost.url, os.path.join(self.workdir, "pipeline"),
            api={"workers": str(self.api_workers)},
            auth={"required": "true"},
            webhook={"url": receiver_url, "secret": WEBHOOK_SECRET, "retry_delay": "1"},
            retention={"originals": self.plan.originals_kept},
            **({"storage": {"root": os.path.join(self.stores[0], "storage")}}
               if self.stores else {}))
        self.key = self.pipeline.add_key("soak", "upload,grant,delete")
        self.ledger = Ledger("soak", self.pipeline.base_url, self.pipeline.root,
                             [r.name for r in self.pipeline.renditions])
        self.api = self.pipeline.start_api()
        for instance in (1, 2):
            self.workers[str(instance)] = self.pipeline.start_worker(instance)
        self.webhook = self.pipeline.start("webhook", "webhook")
        self.nginx = self.pipeline.start_nginx(rate_limits="shipped")
        self.prometheus = Prometheus(self.workdir, f"127.0.0.1:{self.pipeline.port}", log)
        self.inputs = make_inputs(os.path.join(self.workdir, "inputs"), self.plan.smoke, log)
        self.max_attempts = imgworker_config.load(self.pipeline.config_path).worker.max_attempts
        log(f"  nginx {self.nginx.base_url} (shipped rate limits), API {self.pipeline.base_url} "
            f"({self.api_workers} processes), 2 workers, webhook sender, broker: {self.vhost.note}")
        if self.stores:
            log(f"  storage: {self.stores[1]}")

    # -- load -----------------------------------------------------------------------
    def start_load(self, phases, exclude=(), start=None, wait=False):
        """bench/soak_load.py with ``phases``: [[name, rate, seconds, via,
        erase share]]; returns its start time."""
        start = start or time.time() + 1.0
        spec = {"nginx": self.nginx.base_url, "api": self.pipeline.base_url, "key": self.key,
                "inputs": {name: {"path": entry["path"], "content_type": entry["content_type"]}
                           for name, entry in self.inputs.items()},
                "sequence": sequence(exclude=exclude), "phases": phases, "start": start,
                "out": self.load_dir, "seed": 25 + self.next_upload, "first": self.next_upload,
                "threads": 32}
        self.next_upload += sum(int(round(rate * seconds)) for _n, rate, seconds, _v, _e in phases)
        path = os.path.join(self.load_dir, f"spec-{self.next_upload}.json")
        with open(path, "w") as handle:
            json.dump(spec, handle)
        done = os.path.join(self.load_dir, "load-done")
        if os.path.exists(done):
            os.unlink(done)
        self.load_process = subprocess.Popen([sys.executable, "-m", "bench.soak_load", path],
                                             cwd=REPO)
        if wait:
            self.load_process.wait()
        return start

    def uploads(self):
        path = os.path.join(self.load_dir, "uploads.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.endswith("\n")]

    def queue_depth(self):
        try:
            return self.pipeline.queue_depth()
        except pika.exceptions.AMQPError:
            return None

    def wait_idle(self, ids, timeout):
        """Until every job in ``ids`` has ended (or was erased) and the
        queue is empty."""
        def ended():
            return self._all_ended(ids) and self.queue_depth() == 0
        try:
            wait_until(ended, "the jobs to end", timeout=timeout, interval=1)
            return True
        except AssertionError:
            return False

    # -- 1. calibration ---------------------------------------------------------------
    def calibrate(self):
        """Jobs per second the 2 workers end with the queue never empty and
        the mix's ingest running beside them."""
        plan, log = self.plan, self.log
        self.marks["calibration"] = time.time()
        # a first guess: a small burst straight to the API, drained
        probe_rate = 20.0
        before = len(self.uploads())
        self.start_load([["probe", probe_rate, 1.0 if plan.smoke else 2.0, "api", 0.0]],
                        exclude=("poison",), wait=True)
        probe = [u for u in self.uploads()[before:] if u["id"]]
        self.wait_idle([u["id"] for u in probe], 300)
        guess = self._ended_rate([u["id"] for u in probe]) or 2.0
        log(f"  first guess: {guess:.2f} jobs/s from {len(probe)} jobs")
        first_guess = guess
        # the queue filled, then uploads through nginx at 1.3 x the guess; a
        # window in which the queue ran empty measured the uploads, not the
        # workers: again, faster, from what it did measure (at most 3 tries)
        for tries in range(1, 4):
            capacity, ended, window, depths = self._calibration_window(guess)
            if min(depths, default=None) != 0 or tries == 3:
                break
            log(f"  the queue ran empty at {1.3 * guess:.2f} uploads/s ({capacity:.2f} jobs/s "
                f"ended): again at {1.69 * max(guess, capacity):.2f}")
            guess = max(guess, capacity) * 1.3
        rate = 1.3 * guess
        accepted_share = sum(c for n, c in MIX if not n.startswith("refused")) / 200
        self.calibration = {
            "guess": first_guess, "probe_jobs": len(probe),
            "prefill": max(10, int(guess * plan.prefill_seconds)),
            "upload_rate": rate, "window": window, "ended": ended, "tries": tries,
            "capacity": capacity, "min_depth": min((d for d in depths if d is not None),
                                                   default=None),
            "accepted_share": accepted_share,
            "load_80": 0.8 * capacity / accepted_share,
            "load_150": 1.5 * capacity / accepted_share,
            "loadavg": os.getloadavg(),
        }
        if self.calibration["min_depth"] == 0:
            self.notes.append("The queue ran empty during the calibration window: the "
                              "capacity measured is a lower bound.")
        log(f"  capacity {capacity:.2f} jobs/s ({ended} jobs ended in "
            f"{window:.0f} s, queue at least {self.calibration['min_depth']}); "
            f"load {self.calibration['load_80']:.2f} uploads/s (80%), "
            f"{self.calibration['load_150']:.2f} (150%)")

    def _calibration_window(self, guess):
        """The queue prefilled, then uploads through nginx at 1.3 x ``guess``
        for plan.calibration seconds; after 2 s, the jobs ended in the
        window: (jobs/s, jobs ended, window seconds, queue depths sampled)."""
        plan = self.plan
        prefill = max(10, int(guess * plan.prefill_seconds))
        before = len(self.uploads())
        start = self.start_load([["prefill", 40.0, prefill / 40.0, "api", 0.0],
                                 ["calibration", 1.3 * guess, plan.calibration, "nginx", 0.0]],
                                exclude=("poison",))
        window_start = start + prefill / 40.0 + 2.0
        window_end = start + prefill / 40.0 + plan.calibration
        depths = []
        time.sleep(max(0.0, window_start - time.time()))
        while time.time() < window_end:
            depths.append(self.queue_depth())
            time.sleep(1.0)
        self.load_process.wait()
        calibration = [u for u in self.uploads()[before:] if u["id"]]
        self.wait_idle([u["id"] for u in calibration], 600)
        ended = 0
        for u in calibration:
            job = jobs.read(self.pipeline.root, u["id"])
            if job is not None and job.ended_at and window_start <= job.ended_at <= window_end:
                ended += 1
        window = window_end - window_start
        return ended / window, ended, window, [d for d in depths if d is not None]

    def _ended_rate(self, ids):
        records = [jobs.read(self.pipeline.root, job_id) for job_id in ids]
        records = [r for r in records if r is not None and r.ended_at and r.started_at]
        if len(records) < 2:
            return None
        first = min(r.started_at for r in records)
        last = max(r.ended_at for r in records)
        return len(records) / (last - first) if last > first else None

    # -- 2 and 3: the load, the step, the drain -----------------------------------------
    def soak(self):
        plan, log = self.plan, self.log
        rate80, rate150 = self.calibration["load_80"], self.calibration["load_150"]
        killer = RendererKiller(self)
        killer.start()
        self.killer = killer
        self.retention = Retention(self)
        self.retention.start()
        start = self.start_load([["steady", rate80, plan.main, "nginx", 0.02],
                                 ["step", rate150, plan.step, "nginx", 0.02]],
                                start=time.time() + 2.0)
        self.marks.update({"start": start, "warmup_end": start + plan.warmup,
                           "step": start + plan.main, "step_end": start + plan.main + plan.step})
        sampler = soak_sample.Sampler(self)
        self.sampler = sampler
        stopped = restarted = False
        log(f"  load: {rate80:.2f} uploads/s for {plan.main / 60:.1f} min, then "
            f"{rate150:.2f}/s for {plan.step / 60:.1f} min with worker 2 stopped")
        next_sample = start
        next_report = start + 60
        while True:
            now = time.time()
            if not stopped and now >= self.marks["step"]:
                # as `systemctl stop imgworker@2` would
                self.workers["2"].signal(signal.SIGTERM)
                self.marks["worker_stopped"] = time.time()
                stopped = True
                log("  step: 150% load, worker 2 stopped (SIGTERM)")
            if stopped and not restarted and now >= self.marks["step_end"]:
                code = self.workers["2"].stop(60)
                self.notes.append(f"Worker 2 exited {code} after its SIGTERM.")
                self.workers["2"] = self.pipeline.start_worker(2)
                self.marks["worker_started"] = time.time()
                restarted = True
                log("  step over: worker 2 started again; draining")
            if now >= next_sample:
                phase = ("calibration" if now < start else "steady" if now < self.marks["step"]
                         else "step" if now < self.marks["step_end"] else "drain")
                sampler.sample(phase)
                next_sample += plan.interval
                if now >= next_report:
                    last = sampler.samples[-1]
                    p99 = last["latency"]["p99"]
                    log(f"  {(now - start) / 60:5.1f} min ({phase}): queue {last['queue']}, "
                        f"p99 {p99 if p99 is None else round(p99, 2)} s, kills "
                        f"{len(killer.kills)}, alerts "
                        f"{[a['name'] + ':' + a['state'] for a in last['alerts'] or []]}")
                    next_report += 60
            if restarted and self.load_process.poll() is not None:
                ids = [u["id"] for u in self.uploads() if u["id"]]
                if self._all_ended(ids):
                    break
                if now > self.marks["worker_started"] + 900:
                    self.notes.append("The backlog had not drained 15 minutes after the step.")
                    break
            time.sleep(max(0.0, min(next_sample - time.time(), 1.0)))
        self.marks["drained"] = time.time()
        # a last sample, every event delivered
        ids = [u["id"] for u in self.uploads() if u["id"]]
        deadline = time.time() + 120
        while time.time() < deadline and sampler.events_missing(ids):
            time.sleep(2)
        sampler.sample("drain")
        killer.stopping.set()
        killer.join(5)
        self.retention.stopping.set()
        self.retention.join(60)
        self.marks["end"] = time.time()
        self.alert_history = self.prometheus.history(self.marks["calibration"] - 5,
                                                     self.marks["end"])

    def _all_ended(self, ids):
        root = self.pipeline.root
        for job_id in reversed(ids):
            job = jobs.read(root, job_id)
            if job is None:
                if not os.path.exists(os.path.join(root, "tombstones", job_id)):
                    return False
            elif not job.state.finished:
                return False
        return True

    # -- the ledger ------------------------------------------------------------------------
    def check(self):
        uploads = self.uploads()
        erasures = []
        path = os.path.join(self.load_dir, "erasures.jsonl")
        if os.path.exists(path):
            with open(path) as handle:
                erasures = [json.loads(line) for line in handle if line.endswith("\n")]
        erased = {e["id"] for e in erasures if e["status"] == 200}
        accepted = [u["id"] for u in uploads if u["id"]]
        self.ledger.accepted = [job_id for job_id in accepted if job_id not in erased]
        for u in uploads:
            if not u["id"]:
                self.ledger.counters.refused[str(u["status"])] = \
                    self.ledger.counters.refused.get(str(u["status"]), 0) + 1
        counters = self.ledger.check(settle_timeout=60)
        # erased jobs: nothing of theirs left; job.deleted delivered
        root = self.pipeline.root
        events = self.sampler.events()
        left, no_event = [], []
        for job_id in erased:
            for where in (os.path.join(root, "originals", job_id), jobs.record_path(root, job_id),
                          os.path.join(root, "renditions", job_id)):
                if os.path.exists(where):
                    left.append(where)
            if "job.deleted" not in events.get(job_id, {}):
                no_event.append(job_id)
        # every job that ended: its event delivered
        undelivered, duplicates = [], 0
        for job_id in self.ledger.accepted:
            job = jobs.read(root, job_id)
            seen = events.get(job_id, {})
            duplicates += sum(max(0, n - 1) for n in seen.values())
            if job is None or f"job.{job.state.value}" not in seen:
                undelivered.append(job_id)
        also_done = sum(1 for job_id in erased if "job.done" in events.get(job_id, {}))
        dead_webhooks = self.prometheus.query(
            'sum(imgworker_webhook_deliveries_total{outcome="dead"}) or vector(0)')
        self.check_results = {
            "counters": counters, "erasures": erasures, "erased": len(erased),
            "erased_left": left, "erased_no_event": no_event, "erased_also_done": also_done,
            "undelivered": undelivered, "duplicate_events": duplicates,
            "dead_webhooks": dead_webhooks[0][1] if dead_webhooks else None,
            "kills": self.killer.kills,
        }

    def close(self):
        if self.load_process is not None and self.load_process.poll() is None:
            self.load_process.kill()
            self.load_process.wait()
        for thing in (self.prometheus,):
            if thing is not None:
                thing.stop()
        if self.pipeline is not None:
            self.pipeline.close()
        if self.receiver is not None:
            self.receiver.kill()
            self.receiver.wait()
        if self.vhost is not None:
            self.vhost.delete()


def _stores_size(workdir, smoke):
    """The storage's own filesystem: 2 GiB for the smoke; for the soak 70%
    of the disk's free space (an hour writes some 35 GB, and the image is
    sparse, on the same disk), so that the storage alert has no reason to
    fire and the disk under the image cannot fill first."""
    if smoke:
        return 2 << 30
    disk = os.statvfs(workdir)
    return int(disk.f_bavail * disk.f_frsize * 0.7) // 4096 * 4096


def run(minutes=60, smoke=False, out=None, log=print):
    """The soak: writes OUT/results.md and OUT/chart.png; returns the
    results (a dict)."""
    out = out or os.path.join(os.path.dirname(__file__), "results", "soak")
    os.makedirs(out, exist_ok=True)
    plan = Plan(minutes, smoke)
    log(f"soak: {'smoke, ' if smoke else ''}{plan.main / 60:.1f} min at 80%, "
        f"{plan.step / 60:.1f} min step; warm-up {plan.warmup / 60:.1f} min, windows "
        f"{plan.window / 60:.1f} min, a sample every {plan.interval:.0f} s")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="imgworker-soak-", dir="/var/tmp") as workdir, \
            filesystem(workdir, log, size=_stores_size(workdir, smoke)) as stores:
        soak = Soak(workdir, plan, log, stores)
        try:
            soak.setup(AMQP_URL)
            soak.calibrate()
            soak.soak()
            soak.check()
        finally:
            soak.close()
        results = soak_report.analyse(soak, plan)
        results["wall_seconds"] = time.time() - started
        soak_report.write(results, out)
        with open(os.path.join(out, "samples.json"), "w") as handle:
            json.dump({"marks": soak.marks, "samples": soak.sampler.samples}, handle)
    log(f"wrote {os.path.join(out, 'results.md')} and {os.path.join(out, 'chart.png')} "
        f"in {(time.time() - started) / 60:.1f} min")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m bench.soak",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                       "soak"))
    args = parser.parse_args(argv)
    run(minutes=args.minutes, smoke=args.smoke, out=args.out,
        log=lambda *words: print(*words, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
