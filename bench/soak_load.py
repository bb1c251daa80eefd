"""python3 -m bench.soak_load SPEC.json: the soak's load generator.

Open loop: a schedule of arrival times fixed in advance (phase by phase, at
each phase's rate, evenly spaced from the spec's start time), each arrival
handed to a pool of threads when its time comes, whatever the answers to the
earlier ones; how late an upload started against its schedule is written
down with it. It runs in a process of its own so that its threads do not
take the GIL from the soak's sampler.

The spec (JSON), written by bench/soak.py:

    {"nginx": URL, "api": URL, "key": KEY (scopes upload, grant, delete),
     "inputs": {name: {"path", "content_type"}}, "sequence": [name, ...],
     "phases": [[name, uploads per second, seconds, "nginx" | "api", erase share]],
     "start": unix time, "out": DIR, "seed": N, "threads": N}

Upload i sends ``sequence[i % len(sequence)]``; odd ones with the key, even
ones with a grant asked of POST /grants (through nginx, with the key) just
before. ``erase share`` of the accepted jobs are erased (DELETE /jobs/<id>
with the key) while queued or rendering: the job's state is read first, and
a job already ended passes its turn to the next one accepted.

Writes DIR/uploads.jsonl (one JSON line per upload: phase, i, sched, t0,
t1, status, id, input, auth), DIR/erasures.jsonl (id, t, seen, status) and,
once every upload is answered, DIR/load-done.
"""

import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def main(argv=None):
    with open((argv or sys.argv[1:])[0]) as handle:
        spec = json.load(handle)
    out = spec["out"]
    inputs = {}
    for name, entry in spec["inputs"].items():
        with open(entry["path"], "rb") as handle:
            inputs[name] = (handle.read(), entry["content_type"])
    sequence = spec["sequence"]
    key = spec["key"]
    rng = random.Random(spec.get("seed", 25))
    lock = threading.Lock()
    uploads = open(os.path.join(out, "uploads.jsonl"), "a", buffering=1)
    erasures = open(os.path.join(out, "erasures.jsonl"), "a", buffering=1)
    local = threading.local()
    owed = [0]          # erasures owed: a job picked had ended before its turn

    def session():
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session

    def erase(job_id):
        s = session()
        try:
            seen = s.get(f"{spec['nginx']}/jobs/{job_id}", timeout=30).json().get("state")
        except (requests.RequestException, ValueError):
            seen = "unknown"
        if seen not in ("queued", "processing"):
            with lock:
                owed[0] += 1
            return
        started = time.time()
        try:
            status = s.delete(f"{spec['nginx']}/jobs/{job_id}", timeout=60,
                              headers={"Authorization": f"Bearer {key}"}).status_code
        except requests.RequestException as error:
            status = f"no answer: {type(error).__name__}"
        with lock:
            erasures.write(json.dumps({"id": job_id, "t": started, "seen": seen,
                                       "status": status}) + "\n")

    def upload(phase, i, sched, via, erase_share):
        name = sequence[i % len(sequence)]
        data, content_type = inputs[name]
        base = spec["nginx"] if via == "nginx" else spec["api"]
        s = session()
        t0 = time.time()
        auth, token, status, job_id = ("key" if i % 2 else "grant"), key, None, None
        try:
            if auth == "grant":
                answer = s.post(f"{spec['nginx']}/grants", json={"owner": f"soak-{i % 97}"},
                                headers={"Authorization": f"Bearer {key}"}, timeout=30)
                if answer.status_code == 201:
                    token = answer.json()["grant"]
                else:
                    status = f"grant {answer.status_code}"
            if status is None:
                answer = s.post(f"{base}/upload", data=data, timeout=60,
                                headers={"Content-Type": content_type,
                                         "Authorization": f"Bearer {token}"})
                status = answer.status_code
                if status == 202:
                    job_id = answer.json()["id"]
        except (requests.RequestException, ValueError) as error:
            status = f"no answer: {type(error).__name__}"
        t1 = time.time()
        with lock:
            uploads.write(json.dumps({"phase": phase, "i": i, "sched": sched, "t0": t0,
                                      "t1": t1, "status": status, "id": job_id, "input": name,
                                      "auth": auth}) + "\n")
            pick = False
            if job_id and name != "poison" and erase_share:
                if owed[0]:
                    owed[0] -= 1
                    pick = True
                else:
                    pick = rng.random() < erase_share
        if pick:
            erase(job_id)

    pool = ThreadPoolExecutor(spec.get("threads", 32))
    start = spec.get("start") or time.time()
    i = spec.get("first", 0)
    at = start
    for phase, rate, seconds, via, erase_share in spec["phases"]:
        count = int(round(rate * seconds))
        for k in range(count):
            sched = at + k / rate
            delay = sched - time.time()
            if delay > 0:
                time.sleep(delay)
            pool.submit(upload, phase, i, sched, via, erase_share)
            i += 1
        at += seconds
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)
    pool.shutdown(wait=True)
    uploads.close()
    erasures.close()
    with open(os.path.join(out, "load-done"), "w") as handle:
        handle.write(str(i))
    return 0


if __name__ == "__main__":
    sys.exit(main())
