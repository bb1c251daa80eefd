"""Jepsen-style bookkeeping for the fault scenarios.

Standard library and Pillow only: tests/system copies it into its booted
containers and runs it there (``python3 -m harness.ledger load|check``)
for the scenarios that need a real systemd.

Every upload is written down with what the API answered. Once a scenario has
settled, the ledger is checked against what a user can see -- the job status,
the rendition files -- and four counters come out:

- lost: the API said 202, yet the job has neither its renditions nor a
  `failed` state;
- duplicated: processed more than once (attempts > 1): allowed, but counted;
- corrupt: a rendition that does not decode, or has the wrong size;
- unexpected: a rendition nobody asked for (an unknown name, or a job no
  upload ever created).

Besides these, ``unanswered``: jobs processed whose client got no answer
(the API died after the broker's confirm, before its 202 reached the
client). Their upload really happened, so they are not unexpected; a client
that retries makes a second job (an idempotency key would dedupe them).
"""

import argparse
import http.client
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from PIL import Image

from imgworker import job as jobs
from harness import samples

#: Every scenario's results, printed as one table at the end of the run.
RESULTS = []


@dataclass
class Counters:
    scenario: str
    accepted: int = 0
    refused: dict = field(default_factory=dict)   # HTTP status -> count
    done: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    unexpected: int = 0
    unanswered: int = 0
    notes: list = field(default_factory=list)


class Ledger:
    def __init__(self, scenario, base_url, root, rendition_names):
        self.base_url = base_url
        self.root = root
        self.rendition_names = set(rendition_names)
        self.counters = Counters(scenario)
        self.accepted = []            # job ids that got 202
        self.responses = []           # (monotonic start, seconds, status)
        # Jobs already on disk belong to an earlier scenario on the same root.
        self.earlier = set(self._rendition_dirs())
        self._lock = threading.Lock()
        self.photo = samples.jpeg(640, 480, quality=85)

    @classmethod
    def for_pipeline(cls, pipeline, scenario):
        return cls(scenario, pipeline.base_url, pipeline.root,
                   [r.name for r in pipeline.renditions])

    def upload(self):
        started = time.monotonic()
        request = urllib.request.Request(self.base_url + "/upload", data=self.photo,
                                         headers={"Content-Type": "image/jpeg"})
        job_id = None
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status = response.status
                job_id = json.load(response)["id"]
        except urllib.error.HTTPError as error:
            status = error.code
        except (OSError, ValueError, http.client.HTTPException):
            # refused, reset, timed out, or cut short mid-body: the client
            # cannot know whether (or as which id) its upload was accepted
            status = "no answer"
        with self._lock:
            self.responses.append((started, time.monotonic() - started, status))
            if status == 202:
                self.accepted.append(job_id)
            else:
                self.counters.refused[status] = self.counters.refused.get(status, 0) + 1
        return status

    def _rendition_dirs(self):
        renditions = os.path.join(self.root, "renditions")
        return os.listdir(renditions) if os.path.isdir(renditions) else []

    def read_job(self, job_id):
        return jobs.read(self.root, job_id)

    def run_load(self, count, per_second, stop=None):
        """Upload ``count`` photos at about ``per_second`` from a thread;
        returns the thread (join it)."""
        def load():
            for i in range(count):
                if stop is not None and stop.is_set():
                    return
                target = start + i / per_second
                time.sleep(max(0.0, target - time.monotonic()))
                self.upload()
        start = time.monotonic()
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        return thread

    def settle(self, timeout=120):
        """Wait until every accepted job is done or failed (or time is up)."""
        deadline = time.monotonic() + timeout
        pending = list(self.accepted)
        while pending and time.monotonic() < deadline:
            pending = [job_id for job_id in pending
                       if not getattr(self.read_job(job_id), "state", jobs.State.QUEUED).finished]
            if pending:
                time.sleep(0.2)
        return pending

    def check(self, settle_timeout=120):
        """Count lost/duplicated/corrupt/unexpected; record the scenario."""
        self.settle(settle_timeout)
        c = self.counters
        c.accepted = len(self.accepted)
        wanted = self.rendition_names
        for job_id in self.accepted:
            job = self.read_job(job_id)
            if job is not None and job.attempts > 1:
                c.duplicated += 1
            if job is not None and job.state is jobs.State.FAILED:
                c.failed += 1
                continue
            if job is None or job.state is not jobs.State.DONE:
                c.lost += 1
                c.notes.append(f"lost {job_id}: {job.state.value if job else 'no record'}")
                continue
            c.done += 1
            for name, rendition in job.renditions.items():
                path = os.path.join(self.root, rendition["url"].lstrip("/"))
                try:
                    with open(path, "rb") as handle:
                        image = Image.open(io.BytesIO(handle.read()))
                        image.load()
                    if image.size != (rendition["width"], rendition["height"]):
                        raise ValueError(f"size {image.size}")
                except Exception as error:  # noqa: BLE001 - any failure is corruption
                    c.corrupt += 1
                    c.notes.append(f"corrupt {path}: {error}")
            missing = set(wanted) - set(job.renditions)
            if missing:
                c.lost += 1
                c.notes.append(f"lost {job_id}: no {sorted(missing)}")
        renditions = os.path.join(self.root, "renditions")
        accepted = set(self.accepted)
        for job_id in set(self._rendition_dirs()) - self.earlier:
            for name in os.listdir(os.path.join(renditions, job_id)):
                if name.startswith(".tmp-"):
                    # a write a kill cut short: never visible under a real
                    # name, never served; `imgworker sweep` removes it
                    c.notes.append(f"temp file left {job_id}/{name}")
                    continue
                stem = name.rsplit(".", 1)[0]
                if stem not in wanted or self.read_job(job_id) is None:
                    c.unexpected += 1
                    c.notes.append(f"unexpected {job_id}/{name}")
            if job_id not in accepted and self.read_job(job_id) is not None:
                c.unanswered += 1
        RESULTS.append(c)
        return c

    def slowest_refusal(self, since=0.0):
        """Seconds of the slowest non-202 answer after ``since``."""
        times = [seconds for started, seconds, status in self.responses
                 if status != 202 and started >= since]
        return max(times, default=0.0)


    def longest_refusal_window(self):
        """Seconds of the longest run of uploads answered anything but 202,
        from the first one's request to the last one's answer: how long the
        front door was shut."""
        longest, opened, closed = 0.0, None, None
        for started, seconds, status in sorted(self.responses):
            if status == 202:
                if opened is not None:
                    longest = max(longest, closed - opened)
                opened = None
            elif opened is None:
                opened, closed = started, started + seconds
            else:
                closed = max(closed, started + seconds)
        if opened is not None:
            longest = max(longest, closed - opened)
        return longest


def table(results):
    header = ("scenario", "accepted", "done", "failed", "lost", "duplicated", "corrupt",
              "unexpected", "unanswered", "refused")
    rows = [header] + [(c.scenario, c.accepted, c.done, c.failed, c.lost, c.duplicated,
                        c.corrupt, c.unexpected, c.unanswered,
                        " ".join(f"{k}x{v}" for k, v in sorted(c.refused.items(), key=str)) or "-")
                       for c in results]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None):
    """In a container: ``load`` uploads and saves the ledger; ``check``
    settles it and prints the counters as JSON."""
    parser = argparse.ArgumentParser(prog="python3 -m harness.ledger")
    parser.add_argument("command", choices=("load", "check"))
    parser.add_argument("--state", required=True, help="the ledger's JSON file")
    parser.add_argument("--scenario", default="")
    parser.add_argument("--base-url", default="http://127.0.0.1")
    parser.add_argument("--root", default="/var/lib/imgworker")
    parser.add_argument("--renditions", default="large,medium,thumb")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="uploads per second")
    parser.add_argument("--settle", type=float, default=120.0)
    args = parser.parse_args(argv)
    ledger = Ledger(args.scenario, args.base_url, args.root, args.renditions.split(","))
    if args.command == "load":
        ledger.run_load(args.count, args.rate).join()
        with open(args.state + ".new", "w") as handle:
            json.dump({"accepted": ledger.accepted, "responses": ledger.responses,
                       "earlier": sorted(ledger.earlier),
                       "refused": {str(k): v for k, v in ledger.counters.refused.items()}},
                      handle)
        os.rename(args.state + ".new", args.state)
        return 0
    with open(args.state) as handle:
        state = json.load(handle)
    ledger.accepted = state["accepted"]
    ledger.responses = [tuple(r) for r in state["responses"]]
    ledger.counters.refused = state["refused"]
    ledger.earlier = set(state["earlier"])
    counters = ledger.check(args.settle)
    json.dump({**asdict(counters), "notes": counters.notes[:20],
               "slowest_refusal": round(ledger.slowest_refusal(), 3),
               "table": table([counters])}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
