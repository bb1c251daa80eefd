"""``imgworker status``: the queues as the broker counts them, the workers on
this host as systemd sees them, and what the jobs did in the last minutes.
"""

import os
import shutil
import subprocess
import time

from . import broker
from .job import State, read

#: Every job state, derived so a new one is counted and shown without an
#: edit here: the outcomes first, then what is still under way.
_STATES = sorted(State, key=lambda state: (not state.finished, state.value))


def queues(config):
    """{queue: {"messages", "consumers"}} for the job and dead-letter queues."""
    connection = broker.connect(config, "status")
    found = {}
    try:
        for queue in (config.broker.queue, config.broker.dead_letter_queue):
            channel = connection.channel()
            try:
                state = channel.queue_declare(queue, passive=True).method
                found[queue] = {"messages": state.message_count,
                                "consumers": state.consumer_count}
            except broker.Refused:
                found[queue] = None          # not declared yet: no API or worker ever ran
    finally:
        connection.close()
    return found


def workers():
    """[{"unit", "state", "status"}] of the imgworker units loaded on this
    host; None where systemd does not run."""
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemctl") is None:
        return None
    listed = subprocess.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                             "imgworker@*.service", "imgworker-api.service"],
                            capture_output=True, text=True, timeout=30).stdout
    units = [line.split()[0] for line in listed.splitlines() if line.strip()]
    found = []
    for unit in units:
        shown = subprocess.run(["systemctl", "show", "-p", "ActiveState,StatusText", unit],
                               capture_output=True, text=True, timeout=30).stdout
        values = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        found.append({"unit": unit, "state": values.get("ActiveState", "?"),
                      "status": values.get("StatusText", "")})
    return found


def recent_jobs(root, minutes):
    """{state: count} of the jobs whose record changed in the last
    ``minutes`` (only the recent records are read)."""
    counts = {state.value: 0 for state in _STATES}
    since = time.time() - 60 * minutes
    try:
        entries = os.scandir(os.path.join(root, "jobs"))
    except FileNotFoundError:
        return counts
    with entries:
        for entry in entries:
            if not entry.name.endswith(".json"):
                continue
            try:
                if entry.stat().st_mtime < since:
                    continue
                job = read(root, entry.name[:-len(".json")])
            except (OSError, ValueError):
                continue                 # replaced or removed while we looked
            if job is not None:
                counts[job.state.value] += 1
    return counts


def collect(config, minutes):
    try:
        broker_queues, broker_error = queues(config), None
    except broker.BrokerUnavailable as error:
        broker_queues, broker_error = None, str(error)
    return {"queues": broker_queues, "broker_error": broker_error, "workers": workers(),
            "minutes": minutes, "jobs": recent_jobs(config.storage.root, minutes)}


def render(status):
    """The human-readable status, as lines."""
    lines = []
    if status["queues"] is None:
        lines.append(f"broker: unreachable: {status['broker_error']}")
    else:
        for queue, counts in status["queues"].items():
            lines.append(f"{queue}: " + ("not declared yet" if counts is None else
                                         f"{counts['messages']} messages, "
                                         f"{counts['consumers']} consumers"))
    if status["workers"] is None:
        lines.append("units: systemd does not run here")
    else:
        lines.append(f"units on this host: {len(status['workers'])}")
        lines += [f"  {w['unit']}: {w['state']}" + (f" -- {w['status']}" if w["status"] else "")
                  for w in status["workers"]]
    jobs = status["jobs"]
    lines.append(f"jobs changed in the last {status['minutes']:g} minutes: "
                 + ", ".join(f"{jobs[state.value]} {state.value}" for state in _STATES))
    return lines
