"""The soak's judgement and its report: OUT/results.md and OUT/chart.png.

How each criterion is judged (after the warm-up, over the 80% phase only):

- Growth. The *first window* is the window's length from the end of the
  warm-up, the *last window* the same length before the step. Each process
  (a pid) present in both is judged by its floor in each -- the lowest
  RSS, fd count and thread count of its samples there -- so that a sample
  taken mid-job (a renderer decoding a 12 MP PNG, an API process holding a
  body) does not read as growth, while a leak, which raises the floor,
  does. It holds when no such process's RSS floor grew more than 5% and no
  fd or thread floor grew at all. A renderer killed is replaced by a new
  pid: a new series, judged only if it too spans both windows; replacements
  born later are listed with their peak beside the kind's first-window peak.
- Queue: the least-squares slope of the queue depth (messages ready)
  against time, in jobs per minute, below 1.
- Latency: upload (the load generator's request) to the job.done webhook
  at the receiver, for jobs uploaded in each window; p99 of the last window
  within 20% of the first's (at most 1.2 x; lower is fine).
- Ledger (harness/ledger.py): 0 lost, 0 corrupt; every job that ended has
  its job.done or job.failed delivered; every job erased has job.deleted
  delivered and nothing left on the disk.
- Alerts: none firing (Prometheus's ALERTS series) during the 80% phase;
  in the step, ImgworkerBacklogWillNotDrain and ImgworkerWorkerGone firing
  before it ends.
"""

import datetime
import os
import re
import statistics

from harness.ledger import table as ledger_table

from . import report as bench_report
from .soak_sample import KINDS, percentile

GROWTH_LIMIT = 0.05
QUEUE_SLOPE_LIMIT = 1.0          # jobs per minute
LATENCY_LIMIT = 1.2
STEP_ALERTS = ("ImgworkerBacklogWillNotDrain", "ImgworkerWorkerGone")


def _slope(points):
    """Least-squares slope of (x, y) points."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


_NOISE = re.compile(r"\b[0-9a-f]{32}\b|\d+(\.\d+)?|/\S+")


def log_warnings(pipeline):
    """{(service, message with ids, numbers and paths blanked): count} of
    the WARNING and ERROR lines of every service the pipeline ran."""
    found = {}
    for service in pipeline.services:
        try:
            with open(service.log_path, errors="replace") as handle:
                lines = [line for line in handle if " WARNING " in line or " ERROR " in line]
        except OSError:
            continue
        kind = re.sub(r"-\d+$", "", service.name)
        for line in lines:
            level = "ERROR" if " ERROR " in line else "WARNING"
            message = line.split(f" {level} ", 1)[1].split(" ", 2)[-1].strip()
            key = (kind, level, _NOISE.sub("N", message)[:160])
            found[key] = found.get(key, 0) + 1
    return found


def _count(first, last):
    """(first, last) of a count (fds, threads): its median in the first
    window and its floor in the last. It grew if even its lowest sample in
    the last window is above its usual value in the first: a leak lifts the
    whole of it, while a count that comes and goes with the work in hand (a
    connection per request in flight, a renderer being replaced) does not
    read as growth whichever window its peaks and dips fall in."""
    return statistics.median_low(first), min(last)


def _sockets(p):
    return p.get("sockets", 0)


def _files(p):
    """Open fds that are not sockets: files, pipes, eventfds."""
    return p["fds"] - _sockets(p)


def _gc_line(runs):
    """One line on the soak's ``imgworker gc`` runs: (start, seconds,
    originals removed, index entries read, exit code) each."""
    if not runs:
        return "- imgworker gc: no run"
    seconds = [r[1] for r in runs]
    removed = sum(r[2] or 0 for r in runs)
    failed = sum(1 for r in runs if r[4] != 0 or r[2] is None)
    return (f"- imgworker gc: {len(runs)} runs, {removed} originals removed, "
            f"{statistics.fmean(seconds):.2f} s a run (max {max(seconds):.2f} s, "
            f"{max(r[3] or 0 for r in runs)} index entries read at most), {failed} failed")


def analyse(soak, plan):
    marks = soak.marks
    samples = soak.sampler.samples
    first = (marks["warmup_end"], marks["warmup_end"] + plan.window)
    last = (marks["step"] - plan.window, marks["step"])
    steady = [s for s in samples if s["phase"] == "steady"]
    measured = [s for s in steady if s["t"] >= marks["warmup_end"]]

    def within(t, window):
        return window[0] <= t <= window[1]

    # -- processes ------------------------------------------------------------------
    series = {}
    for s in samples:
        for p in s["procs"]:
            series.setdefault((p["kind"], p["pid"]), []).append((s["t"], s["phase"], p))
    processes, kinds = [], {}
    for (kind, pid), points in sorted(series.items(), key=lambda kv: (KINDS.index(kv[0][0]),
                                                                      kv[1][0][0])):
        in_first = [p for t, phase, p in points if phase == "steady" and within(t, first)]
        in_last = [p for t, phase, p in points if phase == "steady" and within(t, last)]
        row = {"kind": kind, "pid": pid, "born": points[0][0], "samples": len(points),
               "peak_rss": max(p["rss"] for _t, _ph, p in points)}
        if in_first and in_last:
            row["rss"] = (min(p["rss"] for p in in_first), min(p["rss"] for p in in_last))
            for name, value in (("files", _files), ("sockets", _sockets),
                                ("threads", lambda p: p["threads"])):
                row[name] = _count([value(p) for p in in_first], [value(p) for p in in_last])
            row["rss_growth"] = row["rss"][1] / row["rss"][0] - 1
            # which sockets: where the count grows, the kind that grew says why
            seen_kinds = sorted({k for p in in_first + in_last for k in p.get("socket_kinds", {})})
            row["socket_kinds"] = {
                k: _count([p.get("socket_kinds", {}).get(k, 0) for p in in_first],
                          [p.get("socket_kinds", {}).get(k, 0) for p in in_last])
                for k in seen_kinds}
            if kind != "renderer":
                row["holds"] = (row["rss_growth"] <= GROWTH_LIMIT
                                and row["files"][1] <= row["files"][0]
                                and row["sockets"][1] <= row["sockets"][0]
                                and row["threads"][1] <= row["threads"][0])
        processes.append(row)
        entry = kinds.setdefault(kind, {"pids": 0, "judged": 0, "later": []})
        entry["pids"] += 1
        if "holds" in row:
            entry["judged"] += 1
        elif points[0][0] > first[0]:
            entry["later"].append(row)

    # Each kind as a whole, over every process of the kind in each window:
    # RSS by its floor (the lowest sum of the kind's processes in a sample),
    # the renderers' by their peak; fds and threads by the median of the
    # kind's sums. A renderer keeps the heap of the largest image it decoded
    # for the next job (imgworker/allocator.py: up to its trim threshold), so
    # its RSS is a high-water mark, flat once a 12 MP job has passed, and a
    # killed renderer's replacement starts low again: the kind's peak is what
    # a leak would lift, and the renderers are judged by it, not one by one.
    for kind, entry in kinds.items():
        def sums(window):
            found = []
            for s in steady:
                if within(s["t"], window):
                    ps = [p for p in s["procs"] if p["kind"] == kind]
                    if ps:
                        found.append({"rss": sum(p["rss"] for p in ps),
                                      "files": sum(_files(p) for p in ps),
                                      "sockets": sum(_sockets(p) for p in ps),
                                      "threads": sum(p["threads"] for p in ps),
                                      "peak": max(p["rss"] for p in ps)})
            return found
        in_first, in_last = sums(first), sums(last)
        if in_first and in_last:
            by = "peak" if kind == "renderer" else "floor"
            pick = max if by == "peak" else min
            key = "peak" if by == "peak" else "rss"
            entry["by"] = by
            entry["rss"] = (pick(s[key] for s in in_first), pick(s[key] for s in in_last))
            entry["peak"] = (max(s["peak"] for s in in_first), max(s["peak"] for s in in_last))
            for name in ("files", "sockets", "threads"):
                entry[name] = _count([s[name] for s in in_first], [s[name] for s in in_last])
            entry["growth"] = entry["rss"][1] / entry["rss"][0] - 1
            entry["holds"] = (entry["growth"] <= GROWTH_LIMIT
                              and entry["files"][1] <= entry["files"][0]
                              and entry["sockets"][1] <= entry["sockets"][0]
                              and entry["threads"][1] <= entry["threads"][0])

    # the machine: cores busy, the soak's own and the rest
    def cpu(window):
        values = [s["cpu"] for s in steady if within(s["t"], window) and s.get("cpu")]
        if not values:
            return None
        return {name: statistics.fmean(v[name] for v in values) for name in ("machine", "ours")}
    machine_cpu = {"first": cpu(first), "last": cpu(last)}

    # -- queue, metrics directory, storage ---------------------------------------------
    queue_points = [((s["t"] - marks["start"]) / 60, s["queue"]) for s in measured
                    if s["queue"] is not None]
    slope = _slope(queue_points)
    depths = [y for _x, y in queue_points]

    def ends(key):
        values = [s[key] for s in measured if s[key] is not None]
        return (values[0], values[-1]) if values else (None, None)

    # -- latency --------------------------------------------------------------------------
    sampler = soak.sampler
    by_window = {"first": [], "last": []}
    all_steady = []
    for job_id, seconds in sampler.done.items():
        t0, phase, _input = sampler.uploaded[job_id]
        if phase != "steady":
            continue
        all_steady.append(seconds)
        if within(t0, first):
            by_window["first"].append(seconds)
        if within(t0, last):
            by_window["last"].append(seconds)
    latency = {name: {"n": len(values), "p50": percentile(values, 50),
                      "p99": percentile(values, 99)} for name, values in by_window.items()}
    latency["all"] = {"n": len(all_steady), "p50": percentile(all_steady, 50),
                      "p99": percentile(all_steady, 99)}

    # -- uploads ----------------------------------------------------------------------------
    uploads = soak.uploads()
    phases = {}
    for u in uploads:
        entry = phases.setdefault(u["phase"], {"uploads": 0, "statuses": {}, "lag": [],
                                               "answer": [], "inputs": {}, "auth": {}})
        entry["uploads"] += 1
        entry["statuses"][str(u["status"])] = entry["statuses"].get(str(u["status"]), 0) + 1
        entry["lag"].append(u["t0"] - u["sched"])
        entry["answer"].append(u["t1"] - u["t0"])
        entry["inputs"][u["input"]] = entry["inputs"].get(u["input"], 0) + 1
        entry["auth"][u["auth"]] = entry["auth"].get(u["auth"], 0) + 1

    # -- alerts ---------------------------------------------------------------------------
    alerts = {}
    for series_ in soak.alert_history:
        key = (series_["name"], tuple(sorted(series_["labels"].items())))
        entry = alerts.setdefault(key, {"name": series_["name"], "labels": series_["labels"],
                                        "pending": None, "firing": None, "last": None})
        times = series_["times"]
        if times:
            entry[series_["state"]] = min(times) if entry[series_["state"]] is None \
                else min(entry[series_["state"]], min(times))
            entry["last"] = max(times + ([entry["last"]] if entry["last"] else []))
            if series_["state"] == "firing":
                entry.setdefault("firing_times", []).extend(times)
    fired_steady = [a for a in alerts.values() if any(
        marks["start"] <= t < marks["step"] for t in a.get("firing_times", []))]
    fired_step = {a["name"] for a in alerts.values() if any(
        marks["step"] <= t <= marks["step_end"] for t in a.get("firing_times", []))}

    # -- the step: how far past capacity it went -------------------------------------------
    step_window = (marks["step"], marks["step_end"])
    step_seconds = step_window[1] - step_window[0]
    step = {
        "accepted": sum(1 for u in uploads if u["phase"] == "step" and u["id"]) / step_seconds,
        "done": sum(1 for t in sampler.done_at.values() if within(t, step_window))
        / step_seconds,
        "slope": _slope([((s["t"] - marks["start"]) / 60, s["queue"]) for s in samples
                         if s["phase"] == "step" and s["queue"] is not None]),
        "max_queue": max((s["queue"] for s in samples if s["phase"] == "step"
                          and s["queue"] is not None), default=None),
    }

    # -- verdicts ----------------------------------------------------------------------------
    c = soak.check_results
    counters = c["counters"]
    verdicts = []
    growth_bad = [f"{p['kind']} {p['pid']}" for p in processes if p.get("holds") is False]
    growth_bad += [f"the {kind} kind" for kind, entry in kinds.items()
                   if entry.get("holds") is False]
    verdicts.append(("No process's RSS grows more than 5%, no fd or thread count grows",
                     not growth_bad and any("holds" in p for p in processes),
                     f"{sum('holds' in p for p in processes)} processes and "
                     f"{sum('holds' in e for e in kinds.values())} kinds judged; "
                     + (", ".join(growth_bad) + " grew" if growth_bad else "none grew")))
    verdicts.append(("Queue depth slope below 1 job/min",
                     slope is not None and slope < QUEUE_SLOPE_LIMIT,
                     f"{slope:+.3f} jobs/min over {len(queue_points)} samples"
                     if slope is not None else "no samples"))
    lf, ll = latency["first"]["p99"], latency["last"]["p99"]
    verdicts.append(("Latency p99, last window within 20% of the first",
                     lf is not None and ll is not None and ll <= LATENCY_LIMIT * lf,
                     f"first {lf:.2f} s, last {ll:.2f} s ({ll / lf - 1:+.0%})"
                     if lf and ll else "no jobs done in a window"))
    ledger_ok = (counters.lost == 0 and counters.corrupt == 0 and not c["undelivered"]
                 and not c["erased_left"] and not c["erased_no_event"])
    verdicts.append(("Ledger: 0 lost, 0 corrupt, every webhook delivered, erased jobs gone "
                     "with job.deleted", ledger_ok,
                     f"lost {counters.lost}, corrupt {counters.corrupt}, undelivered "
                     f"{len(c['undelivered'])}, erased with files left {len(c['erased_left'])}, "
                     f"erased without job.deleted {len(c['erased_no_event'])}"))
    verdicts.append(("No alert fires during the 80% phase", not fired_steady,
                     ", ".join(a["name"] for a in fired_steady) or "none fired"))
    verdicts.append(("In the 150% step with a worker stopped, the backlog and worker alerts fire",
                     all(name in fired_step for name in STEP_ALERTS),
                     "fired in the step: " + (", ".join(sorted(fired_step)) or "none")))
    timing = {0, 1, 2, 4, 5}        # what a smoke run does not judge
    return {
        "plan": plan, "marks": marks, "calibration": soak.calibration, "notes": soak.notes,
        "machine": bench_report.machine(), "api_workers": soak.api_workers,
        "broker": soak.vhost.note, "prometheus": soak.prometheus.version,
        "inputs": soak.inputs, "processes": processes, "kinds": kinds, "first": first,
        "last": last, "slope": slope, "depths": depths, "metrics_files": ends("metrics_files"),
        "storage": ends("storage_bytes"), "storage_files": ends("storage_files"),
        "latency": latency, "phases": phases, "alerts": alerts, "check": c,
        "verdicts": verdicts, "timing": timing, "samples": samples,
        "sample_cost": [s["cost"] for s in samples], "loadavg_end": os.getloadavg(),
        "warnings": log_warnings(soak.pipeline), "log_bytes": ends("log_bytes"),
        "cpu": machine_cpu, "step": step, "gc_runs": soak.retention.runs,
        "storage_note": (soak.stores[1] if soak.stores else "a directory of the run's own")
        + (", its size read by statvfs" if soak.storage_size.empty is not None
           else ", its size read by du"),
    }


# -- results.md ------------------------------------------------------------------------

def _mb(value):
    return f"{value / 1e6:.1f}" if value is not None else "–"


def _utc(t, form="%H:%M:%S"):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(form)


def _clock(t, marks):
    if t is None:
        return "–"
    rel = t - marks["start"]
    sign = "-" if rel < 0 else "+"
    rel = abs(rel)
    return (f"{sign}{int(rel // 60)}:{int(rel % 60):02d} "
            f"({_utc(t)} UTC)")


def _phase_of(t, marks):
    if t is None:
        return "–"
    if t < marks["start"]:
        return "calibration"
    if t < marks["warmup_end"]:
        return "80%, warm-up"
    if t < marks["step"]:
        return "80%"
    if t <= marks["step_end"]:
        return "150% step"
    return "drain"


def _seconds(value):
    return f"{value:.2f} s" if value is not None else "–"


def write(results, out):
    plan, marks, cal = results["plan"], results["marks"], results["calibration"]
    c = results["check"]
    lines = ["# imgworker soak", ""]
    if plan.smoke:
        lines += ["**Smoke run** (about 2 minutes, tiny inputs, windows of seconds): it checks "
                  "that the soak runs and writes everything; it measures nothing, and its "
                  "timing verdicts are not verdicts.", ""]
    lines += [f"Produced by `script/bench --only soak --minutes {plan.minutes:g}"
              f"{' --smoke' if plan.smoke else ''}` (bench/soak.py), "
              f"{_utc(marks['calibration'], '%Y-%m-%d %H:%M')} "
              f"UTC, {results['wall_seconds'] / 60:.1f} minutes in all. Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in results["machine"].items()
              if key not in ("libvips", "wrk")]
    lines += [f"- load average at the calibration {cal['loadavg'][0]:.2f}, at the end "
              f"{results['loadavg_end'][0]:.2f} (1 min)"]
    scaled = ""
    if plan.scaled:
        scaled = (f" Under 20 minutes, the hour's 5-minute warm-up and 10-minute windows are "
                  f"scaled by {plan.minutes:g}/20.")
    lines += ["", "## Setup", "",
              "The shipped nginx site with its shipped rate limits, the API "
              f"({results['api_workers']} processes, the shipped default), 2 workers, the "
              "webhook sender and a receiver answering 200 (bench/soak_receiver.py); "
              "`[auth] required = true`, one key of scopes upload, grant and delete. "
              "RabbitMQ: " + results["broker"] + ". "
              f"{results['prometheus']} scrapes the API's /metrics every 5 s and evaluates "
              "monitoring/prometheus/imgworker-alerts.yml, unmodified, every 5 s. "
              f"The storage: {results['storage_note']}. "
              f"`[retention] originals = {plan.originals_kept}`, with `imgworker gc` every "
              f"{plan.gc_every:.0f} s (imgworker-gc.timer runs it hourly): at this rate the "
              "originals alone would fill the disk within the hour, as they would a "
              "production machine's without its retention; renditions and records are kept.",
              "",
              f"80% phase {plan.main / 60:.4g} min: warm-up {plan.warmup / 60:.4g} min, "
              f"first window {_clock(results['first'][0], marks)} to "
              f"{_clock(results['first'][1], marks)}, "
              f"last window {_clock(results['last'][0], marks)} to "
              f"{_clock(results['last'][1], marks)}; then {plan.step / 60:.4g} min at 150% with "
              f"worker 2 stopped (SIGTERM), then worker 2 started again and the backlog drained. "
              f"A sample every {plan.interval:g} s.{scaled} Times below are from the start of "
              "the 80% load.", "",
              "Inputs (one upload in 200 of each, per the count; the poison one's renderer is "
              "killed each attempt):", "",
              "| input | bytes | per 200 uploads |", "|---|---|---|"]
    from .soak import MIX
    for name, count in MIX:
        lines.append(f"| {name} | {results['inputs'][name]['bytes']:,} | {count} |")
    lines += ["", "## Calibration", "",
              f"A first guess of {cal['guess']:.2f} jobs/s from {cal['probe_jobs']} jobs sent "
              f"straight to the API and drained; then {cal['prefill']} jobs queued and the mix "
              f"(without the renderer killer) uploaded through nginx at {cal['upload_rate']:.2f}/s "
              f"for {plan.calibration:g} s, so that the workers never wait and ingest runs beside "
              f"them as under load. Jobs ended in the {cal['window']:.0f} s window: "
              f"{cal['ended']}, the queue at least {cal['min_depth']} deep throughout"
              + (f" (try {cal['tries']}: a window in which the queue ran empty measured the "
                 "uploads, not the workers, and was run again at 1.3 x what it measured)"
                 if cal.get("tries", 1) > 1 else "") + ".", "",
              f"- **drain capacity of 2 workers: {cal['capacity']:.2f} jobs/s**",
              f"- load at 80%: {cal['load_80']:.2f} uploads/s "
              f"({cal['accepted_share']:.1%} of uploads are accepted jobs)",
              f"- load at 150%: {cal['load_150']:.2f} uploads/s", "",
              "The machine has 2 cores shared with whatever else runs on it (the load "
              "average above): the capacity is a measurement of that minute, not of the "
              "hardware.", ""]
    lines += ["## Load", "",
              "| phase | uploads | answers | with key / grant | start late p99 (max) | "
              "answer p50 / p99 |", "|---|---|---|---|---|---|"]
    for phase, entry in results["phases"].items():
        lines.append(
            f"| {phase} | {entry['uploads']} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(entry["statuses"].items())) + " | "
            f"{entry['auth'].get('key', 0)} / {entry['auth'].get('grant', 0)} | "
            f"{percentile(entry['lag'], 99) * 1000:.0f} ms ({max(entry['lag']) * 1000:.0f} ms) | "
            f"{percentile(entry['answer'], 50) * 1000:.0f} / "
            f"{percentile(entry['answer'], 99) * 1000:.0f} ms |")
    erasures = c["erasures"]
    statuses = {}
    for e in erasures:
        statuses[str(e["status"])] = statuses.get(str(e["status"]), 0) + 1
    seen = {}
    for e in erasures:
        seen[e["seen"]] = seen.get(e["seen"], 0) + 1
    lines += ["", f"Erasures: {len(erasures)} DELETE /jobs/<id> ("
              + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) + "), of jobs seen "
              + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())) + " just before; "
              f"renderers killed: {len(c['kills'])} (poison jobs' attempts).", ""]

    lines += ["## Processes", "",
              "Each process present in both windows: RSS by its floor (its lowest sample in the "
              "window: a sample mid-job, an API process holding a body, is not growth, a leak "
              "lifts the floor). Counts -- open fds, split into files (and pipes) and sockets, "
              "and threads -- by their median in the first window against their floor in the "
              "last: they grew if even the lowest sample of the last window is above the usual "
              "value of the first (a leak lifts the whole count; connections that come and go "
              "with the requests in flight and nginx's keep-alive pool, or a renderer being "
              "replaced, do not). Renderers are listed but judged as a kind (below). RSS in "
              "MB.", "",
              "| kind | pid | samples | RSS floor first → last | growth | files first → last | "
              "sockets first → last | threads first → last | peak RSS | holds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["processes"]:
        if "rss" in p:
            holds = ("kind" if "holds" not in p else "yes" if p["holds"] else "**no**")
            lines.append(
                f"| {p['kind']} | {p['pid']} | {p['samples']} | {_mb(p['rss'][0])} → "
                f"{_mb(p['rss'][1])} | {p['rss_growth']:+.1%} | {p['files'][0]} → "
                f"{p['files'][1]} | {p['sockets'][0]} → {p['sockets'][1]} | "
                f"{p['threads'][0]} → {p['threads'][1]} | {_mb(p['peak_rss'])} | {holds} |")
    grew = [p for p in results["processes"]
            if "rss" in p and p["sockets"][1] > p["sockets"][0] and p.get("socket_kinds")]
    if grew:
        lines += ["", "Sockets by kind, of each process whose sockets grew, counted as above: "
                  "listening; accepted (connections to its own listening ports: clients', and "
                  "nginx's keep-alive ones to the API); pair (both ends its own: pika's I/O loop "
                  "wakes itself through one); to port N (connections it made: 5672 is the "
                  "broker); unix; other.", ""]
        for p in grew:
            lines.append(f"- {p['kind']} {p['pid']}: " + ", ".join(
                f"{kind} {first} → {last}" for kind, (first, last) in p["socket_kinds"].items()))
    lines += ["", "Each kind as a whole, its processes summed in each sample: RSS by the floor of "
              "the sum, the renderers' by their peak; counts as above, of the sums. A renderer "
              "keeps the heap of the largest image it decoded for the next job "
              "(imgworker/allocator.py, up to its trim threshold of 256 MiB), so its RSS is a "
              "high-water mark, flat once a 12 MP job has passed, and a renderer killed is "
              "replaced by a new pid that starts low again; what a leak would lift is the "
              "renderers' peak, so they are judged by it.", "",
              "| kind | processes seen | judged one by one | RSS first → last | growth | "
              "files first → last | sockets first → last | threads first → last | peak RSS "
              "first / last | born after the first window began (at) | holds |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        entry = results["kinds"].get(kind)
        if entry is None:
            continue
        later = entry["later"]
        born = (f"{len(later)} (" + ", ".join(_clock(p["born"], marks).split(" ")[0]
                                            for p in later[:6])
                + (" …" if len(later) > 6 else "") + ")") if later else "–"
        if "holds" in entry:
            lines.append(
                f"| {kind} | {entry['pids']} | {entry['judged']} | {entry['by']} "
                f"{_mb(entry['rss'][0])} → {_mb(entry['rss'][1])} | {entry['growth']:+.1%} | "
                f"{entry['files'][0]} → {entry['files'][1]} | {entry['sockets'][0]} → "
                f"{entry['sockets'][1]} | {entry['threads'][0]} → "
                f"{entry['threads'][1]} | {_mb(entry['peak'][0])} / {_mb(entry['peak'][1])} | "
                f"{born} | {'yes' if entry['holds'] else '**no**'} |")
        else:
            lines.append(f"| {kind} | {entry['pids']} | {entry['judged']} "
                         f"| – | – | – | – | – | – | {born} | – |")
    cpu = results["cpu"]
    if cpu["first"] and cpu["last"]:
        lines += ["", "Cores busy on the machine (of "
                  f"{os.cpu_count()}), mean per window: first {cpu['first']['machine']:.2f} "
                  f"(the soak's own processes and beam.smp {cpu['first']['ours']:.2f}, other "
                  f"work {cpu['first']['machine'] - cpu['first']['ours']:.2f}), last "
                  f"{cpu['last']['machine']:.2f} (the soak's {cpu['last']['ours']:.2f}, other "
                  f"work {cpu['last']['machine'] - cpu['last']['ours']:.2f})."]
    lines += ["", "beam.smp is the machine's one RabbitMQ node: other work on the broker "
              "moves it too.", ""]

    mf, st, sf = results["metrics_files"], results["storage"], results["storage_files"]
    depths = results["depths"]
    lines += ["## Queue, metrics directory, storage", "",
              f"- queue depth (ready) in the 80% phase after the warm-up: mean "
              f"{statistics.fmean(depths) if depths else float('nan'):.1f}, max "
              f"{max(depths) if depths else '–'}; regression slope "
              + (f"**{results['slope']:+.3f} jobs/min**" if results["slope"] is not None
                 else "–"),
              f"- metrics directory: {mf[0]} files after the warm-up, {mf[1]} at the step",
              f"- storage: {_mb(st[0])} MB in {sf[0]} files and directories after the warm-up, "
              f"{_mb(st[1])} MB in {sf[1]} at the step (renditions and records are kept: it "
              "grows with the uploads by design)",
              _gc_line(results["gc_runs"]),
              f"- the services' logs: {_mb(results['log_bytes'][0])} MB after the warm-up, "
              f"{_mb(results['log_bytes'][1])} MB at the step (a line or two per job: under "
              "systemd, journald keeps them within its limits)",
              f"- the sampler took {statistics.fmean(results['sample_cost']) * 1000:.0f} ms per "
              f"sample (max {max(results['sample_cost']) * 1000:.0f} ms)", ""]

    lat = results["latency"]
    lines += ["## Latency", "",
              "Upload request (load generator) to the job.done webhook at the receiver, for jobs "
              "uploaded in the window; failed and erased jobs have none.", "",
              "| window | jobs done | p50 | p99 |", "|---|---|---|---|"]
    for name, label in (("first", "first window"), ("last", "last window"),
                        ("all", "whole 80% phase")):
        lines.append(f"| {label} | {lat[name]['n']} | {_seconds(lat[name]['p50'])} | "
                     f"{_seconds(lat[name]['p99'])} |")
    counters = c["counters"]
    lines += ["", "## Ledger", "", ledger_table([counters]), "",
              f"- accepted and not erased: {counters.accepted}; erased: {c['erased']} (files left "
              f"on disk: {len(c['erased_left'])}; without job.deleted: "
              f"{len(c['erased_no_event'])}; also had job.done, ended just before the DELETE: "
              f"{c['erased_also_done']})",
              f"- webhooks: jobs that ended without their event delivered: "
              f"{len(c['undelivered'])}; events delivered more than once: "
              f"{c['duplicate_events']} (at-least-once); dead-lettered deliveries (Prometheus): "
              f"{c['dead_webhooks']}"]
    if counters.notes:
        lines += ["- notes: " + "; ".join(counters.notes[:10])]
    if c["undelivered"]:
        lines += ["- undelivered: " + ", ".join(c["undelivered"][:10])]
    warnings = results["warnings"]
    lines += ["", "## Warnings and errors in the services' logs", "",
              "Counted by message, ids, numbers and paths blanked (N). The undecodable inputs "
              "and the renderer killer are expected to show here; a broker alarm (\"blocked "
              "publishing\") on this shared RabbitMQ node comes from other work on it.", "",
              "| service | level | message | lines |", "|---|---|---|---|"]
    for (service, level, message), count in sorted(warnings.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"| {service} | {level} | {message.replace('|', '/')} | {count} |")
    if not warnings:
        lines.append("| – | – | none | 0 |")
    if len(warnings) > 15:
        lines.append(f"| … | | {len(warnings) - 15} more kinds of message | "
                     f"{sum(sorted(warnings.values())[:-15])} |")
    lines += ["", "## Alerts", "",
              "Every alert Prometheus held pending or firing (its ALERTS series, 5 s steps), "
              "with the shipped rules:", "",
              "| alert | labels | pending from | firing from | phase fired | last seen |",
              "|---|---|---|---|---|---|"]
    for alert in sorted(results["alerts"].values(), key=lambda a: a["pending"] or a["firing"]
                        or 0):
        lines.append(f"| {alert['name']} | "
                     + (", ".join(f"{k}={v}" for k, v in alert["labels"].items()) or "–")
                     + f" | {_clock(alert['pending'], marks)} | {_clock(alert['firing'], marks)} | "
                     f"{_phase_of(alert['firing'], marks)} | {_clock(alert['last'], marks)} |")
    if not results["alerts"]:
        lines.append("| none | | | | | |")
    step = results["step"]
    lines += ["", f"The step began at {_clock(marks['step'], marks)} (worker 2 stopped at "
              f"{_clock(marks.get('worker_stopped'), marks)}) and ended at "
              f"{_clock(marks['step_end'], marks)}. In it, {step['accepted']:.2f} jobs/s were "
              f"accepted and {step['done']:.2f}/s done (job.done webhooks) by the one worker "
              f"left, against the {cal['capacity']:.2f} jobs/s of both measured at the start; "
              f"the queue grew "
              + (f"{step['slope']:+.1f} jobs/min" if step["slope"] is not None else "–")
              + f" to {step['max_queue']}. ImgworkerBacklogWillNotDrain wants more than 30 s "
              "of work queued (at the done rate of the last 5 minutes) and not shrinking for "
              "a minute; a step that the one worker nearly keeps up with does not get there "
              "within 3 minutes.", ""]

    lines += ["## Verdict", "", "| criterion | holds | measured |", "|---|---|---|"]
    for index, (criterion, holds, measured) in enumerate(results["verdicts"]):
        shown = "yes" if holds else "**no**"
        if plan.smoke and index in results["timing"]:
            shown = "not judged (smoke)"
        lines.append(f"| {criterion} | {shown} | {measured} |")
    if results["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    lines += ["", "![RSS, fds, threads by process kind; queue depth; latency; storage](chart.png)",
              ""]
    path = os.path.join(out, "results.md")
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    chart(results, os.path.join(out, "chart.png"))
    return path


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    marks, samples = results["marks"], results["samples"]
    start = marks["start"]
    figure, axes = pyplot.subplots(3, 2, figsize=(13, 11), sharex=True)
    (rss, fds), (threads, queue), (latency, storage) = axes

    def minutes(t):
        return (t - start) / 60

    for kind in KINDS:
        points = [(minutes(s["t"]), [p for p in s["procs"] if p["kind"] == kind])
                  for s in samples]
        points = [(x, ps) for x, ps in points if ps]
        if not points:
            continue
        xs = [x for x, _ in points]
        for axis, key, scale in ((rss, "rss", 1e6), (fds, "fds", 1), (threads, "threads", 1)):
            axis.plot(xs, [sum(p[key] for p in ps) / scale for _x, ps in points],
                      label=f"{kind} (×{max(len(ps) for _x, ps in points)})")
    xs = [minutes(s["t"]) for s in samples]
    queue.plot(xs, [s["queue"] if s["queue"] is not None else float("nan") for s in samples],
               label="queue depth (ready)")
    cores = queue.twinx()
    cores.plot(xs, [s["cpu"]["ours"] if s.get("cpu") else float("nan") for s in samples],
               color="tab:green", linewidth=0.8, label="cores busy: the soak's processes")
    cores.plot(xs, [s["cpu"]["machine"] - s["cpu"]["ours"] if s.get("cpu") else float("nan")
                    for s in samples], color="tab:red", linewidth=0.8,
               label="cores busy: other work on the machine")
    cores.set_ylabel("cores busy")
    cores.set_ylim(0, max(2, os.cpu_count() or 1))
    cores.legend(loc="upper right", fontsize="x-small")
    latency.plot(xs, [s["latency"]["p50"] if s["latency"]["p50"] is not None else float("nan")
                      for s in samples], label="p50 (jobs done in the sample's 10 s)")
    latency.plot(xs, [s["latency"]["p99"] if s["latency"]["p99"] is not None else float("nan")
                      for s in samples], label="p99")
    storage.plot(xs, [s["storage_bytes"] / 1e9 for s in samples], label="storage (GB)")
    files = storage.twinx()
    files.plot(xs, [s["metrics_files"] or 0 for s in samples], color="tab:red",
               label="metrics directory files")
    files.set_ylabel("metrics directory files")
    files.set_ylim(bottom=0)
    files.legend(loc="lower right", fontsize="small")
    titles = ((rss, "RSS by process kind (MB, summed)"), (fds, "open fds by kind (summed)"),
              (threads, "threads by kind (summed)"), (queue, "queue depth; cores busy"),
              (latency, "upload → job.done webhook (s)"), (storage, "storage"))
    for axis, title in titles:
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        for mark, style in (("warmup_end", ":"), ("step", "--"), ("step_end", "--")):
            if mark in marks:
                axis.axvline(minutes(marks[mark]), color="grey", linestyle=style, linewidth=0.8)
        if axis.lines:
            axis.legend(loc="upper left", fontsize="x-small")
    for axis in axes[-1]:
        axis.set_xlabel("minutes from the start of the 80% load (dotted: warm-up end; "
                        "dashed: the 150% step)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
