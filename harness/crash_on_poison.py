"""Plays a decoder bug that takes its whole process down on one input.

Runs inside the booted container (standard library only). Whenever a job
whose original contains MARK is being processed -- its state file says
`processing` with a new attempt number, which the worker writes before it
starts rendering -- it SIGKILLs that worker's main process, as a segfaulting
decoder would, every attempt. Each kill is printed as "killed PID job ID
attempt N"; it stops once the job is `failed` (or after --max-kills).

It watches the files rather than the journal: journalctl's output through a
pipe arrives in bursts on some releases, too late for a job that renders in
a second.

Used by tests/system/e2e-nspawn for scenario 7 (a job that kills its worker
every time). In-process crashes of the renderer child are covered on the
host by tests/integration/test_worker.py.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

from imgworker import job as jobs     # the package installed in the container

MARK = b"imgworker-e2e-poison"
ROOT = "/var/lib/imgworker"


def main_pid(instance):
    return int(subprocess.run(["systemctl", "show", "-p", "MainPID", "--value",
                               f"imgworker@{instance}"], capture_output=True, text=True,
                              check=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-kills", type=int, default=10)
    args = parser.parse_args()
    originals = os.path.join(ROOT, "originals")
    seen, poison, killed_attempt = set(), set(), {}
    kills = 0
    print("watching", originals, flush=True)
    while kills < args.max_kills:
        for name in set(os.listdir(originals)) - seen:
            if name.startswith(".tmp-") or jobs.read(ROOT, name) is None:
                # The API writes an original under its own name and only then
                # puts the job's record in place: until the record is there
                # the original may still be half written, so look again later.
                continue
            seen.add(name)
            try:
                with open(os.path.join(originals, name), "rb") as original:
                    marked = MARK in original.read()
            except FileNotFoundError:
                continue            # refused and removed (a 503) meanwhile
            if marked:
                poison.add(name)
                print(f"poison job {name}", flush=True)
        for job_id in poison:
            job = jobs.read(ROOT, job_id)
            if job is None:
                continue
            if job.state is jobs.State.FAILED:
                print(f"job {job_id} failed: {job.error}", flush=True)
                return 0
            attempt = job.attempts
            if job.state is jobs.State.PROCESSING and attempt > killed_attempt.get(job_id, 0):
                pid = main_pid(job.worker)
                if pid <= 1:        # between restarts; never kill(0), our own group
                    continue
                os.kill(pid, signal.SIGKILL)
                killed_attempt[job_id] = attempt
                kills += 1
                print(f"killed {pid} job {job_id} attempt {attempt}", flush=True)
        time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(main())
