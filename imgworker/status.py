"""``imgworker status``: the queues as the broker counts them, the workers on
this host as systemd sees them, and what the jobs did in the last minutes.
"""

import os
import shutil
import subprocess
import time

from . import broker
from .job import State, read
from .storage import Storage

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
            "minutes": minutes, "jobs": recent_jobs(config.storage.root, minutes),
            "storage": Storage(config.storage.root).usage(),
            "removed": removed(config.storage.metrics_dir)}


def removed(metrics_dir):
    """{"erased": {reason: n}, "originals_removed": n}: what erasures and gc
    removed, as this host's metrics counted it since it booted (the
    counters live in [storage] metrics_dir, under /run)."""
    from prometheus_client import CollectorRegistry, multiprocess
    counts = {"erased": {"request": 0, "retention": 0}, "originals_removed": 0}
    if not os.path.isdir(metrics_dir):
        return counts
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "imgworker_erased_total":
                counts["erased"][sample.labels["reason"]] = int(sample.value)
            elif sample.name == "imgworker_originals_removed_total":
                counts["originals_removed"] = int(sample.value)
    return counts


def _size(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


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
    usage = status.get("storage") or {}
    if "at" in usage:
        lines.append("storage: " + ", ".join(
            f"{kind} {usage[kind]['files']} files {_size(usage[kind]['bytes'])}"
            for kind in ("originals", "renditions", "records"))
            + f" (measured by the sweep {time.time() - usage['at']:.0f} s ago)")
    elif "storage" in status:
        lines.append("storage: not measured yet (imgworker sweep measures it)")
    if "filesystem" in usage:
        lines.append(f"storage filesystem: {_size(usage['filesystem']['free'])} free of "
                     f"{_size(usage['filesystem']['size'])}")
    removed = status.get("removed")
    if removed is not None:
        lines.append(f"removed since boot: {removed['erased']['request']} jobs erased on "
                     f"request, {removed['erased']['retention']} by retention, "
                     f"{removed['originals_removed']} originals by retention")
    jobs = status["jobs"]
    lines.append(f"jobs changed in the last {status['minutes']:g} minutes: "
                 + ", ".join(f"{jobs[state.value]} {state.value}" for state in _STATES))
    return lines
