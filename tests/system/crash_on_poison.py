"""Plays a decoder bug that takes its whole process down on one input.

Runs inside the booted container (standard library only): it follows the
workers' journal and, whenever an imgworker@ unit starts processing a job
whose original contains MARK, SIGKILLs that worker's main process -- every
attempt, as a segfaulting decoder would. Each kill is printed as
"killed PID job ID"; it stops after --max-kills.

Used by tests/system/e2e-nspawn for scenario 7 (a job that kills its worker
every time). In-process crashes of the renderer child are covered on the
host by tests/integration/test_worker.py.
"""

import argparse
import json
import os
import signal
import subprocess
import sys

MARK = b"imgworker-e2e-poison"
ORIGINALS = "/var/lib/imgworker/originals"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-kills", type=int, default=10)
    args = parser.parse_args()
    journal = subprocess.Popen(["journalctl", "--follow", "--lines=0", "--output=json",
                                "--unit=imgworker@*"], stdout=subprocess.PIPE)
    print("following the journal", flush=True)
    kills = 0
    for line in journal.stdout:
        entry = json.loads(line)
        message, job_id = entry.get("MESSAGE"), entry.get("IMGWORKER_JOB_ID")
        if not isinstance(message, str) or not job_id or ": processing (" not in message:
            continue
        with open(os.path.join(ORIGINALS, job_id), "rb") as original:
            if MARK not in original.read():
                continue
        os.kill(int(entry["_PID"]), signal.SIGKILL)
        kills += 1
        print(f"killed {entry['_PID']} job {job_id}", flush=True)
        if kills >= args.max_kills:
            break
    journal.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
