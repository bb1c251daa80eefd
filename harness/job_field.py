"""One field of a job's JSON, for the shell scripts: a record
(jobs/<id>.json) or the API's answer to GET /jobs/<id>.

    /usr/bin/python3 harness/job_field.py FILE [FIELD]      print FIELD (default: state)
    /usr/bin/python3 harness/job_field.py --finished FILE   exit 0 iff the job is finished

The scripts parse the JSON instead of grepping its text: the spacing of that
text is json.dumps's choice, not part of the format, and a script's own list
of states misses the day job.State changes. A field the job lacks prints
nothing; a file that is missing or not JSON (yet) prints nothing and exits 1.

Runs on the host against a container's files: the standard library and
imgworker/job.py (which needs nothing else) only.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgworker.job import State  # noqa: E402 - the checkout's, whoever runs this

_FINISHED = {state.value for state in State if state.finished}


def _read(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def main(args):
    if args[:1] == ["--finished"]:
        job = _read(args[1]) or {}
        return 0 if job.get("state") in _FINISHED else 1
    path, field = (args + ["state"])[:2]
    job = _read(path)
    if job is None:
        return 1
    print("" if job.get(field) is None else job[field])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
