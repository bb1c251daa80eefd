"""The soak's smoke run (issue 25): about 2 minutes of the whole soak --
calibration, the 80% load with its mix, the 150% step with a worker
stopped, the sampler, Prometheus with the shipped rules, the ledger --
through ``python3 -m bench --only soak --smoke``. It measures nothing and
no timing verdict is asserted; it checks that the soak runs, samples every
process kind and writes what it promises, and that what it checks without
timing (nothing lost, nothing corrupt, every webhook delivered, erased jobs
gone) holds.

Needs RabbitMQ (as tests/integration do), nginx and Debian's prometheus
(script/bootstrap); without prometheus it skips on a laptop and FAILS under
CI=true.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse

import pytest

from harness.pipeline import REPO

KINDS = ("API master", "API worker", "worker", "renderer", "webhook sender", "beam.smp")
HEADINGS = ("# imgworker soak", "## Setup", "## Calibration", "## Load", "## Processes",
            "## Queue, metrics directory, storage", "## Latency", "## Ledger", "## Alerts",
            "## Verdict")


def prometheus():
    if shutil.which("prometheus") is None and not os.path.exists("/usr/bin/prometheus"):
        message = "prometheus is not installed (Debian's prometheus package: script/bootstrap)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_the_soak_smoke_runs_samples_every_process_kind_and_writes_its_results(amqp_url,
                                                                               tmp_path):
    prometheus()
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "--only", "soak", "--minutes", "2",
                          "--smoke", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "IMGWORKER_TEST_AMQP_URL": amqp_url})
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    soak = out / "soak"
    results = (soak / "results.md").read_text()
    # it says it measured nothing
    assert "**Smoke run**" in results and "measures nothing" in results
    position = 0
    for heading in HEADINGS:
        found = results.find(heading, position)
        assert found >= 0, f"no {heading!r} (in order) in results.md:\n{results}"
        position = found

    # the calibration measured a capacity and the load ran at a rate from it
    capacity = re.search(r"\*\*drain capacity of 2 workers: ([\d.]+) jobs/s\*\*", results)
    assert capacity and float(capacity.group(1)) > 0, results
    assert re.search(r"^- load at 80%: [\d.]+ uploads/s", results, re.M), results
    for phase in ("calibration", "steady", "step"):
        row = re.search(rf"^\| {phase} \| (\d+) \| [^|]*202: (\d+)", results, re.M)
        assert row and int(row.group(2)) > 0, (phase, results)

    # the ledger: nothing lost or corrupt, every webhook delivered, the
    # erased jobs gone with their job.deleted
    ledger = re.search(r"^\| soak +\| (\d+) +\| (\d+) +\| (\d+) +\| (\d+) +\| (\d+) +\| (\d+) ",
                       results, re.M)
    assert ledger, results
    accepted, done, _failed, lost, _duplicated, corrupt = map(int, ledger.groups())
    assert accepted > 50 and done > 0, results
    assert lost == 0 and corrupt == 0, results
    assert "| Ledger: 0 lost, 0 corrupt, every webhook delivered, erased jobs gone with " \
           "job.deleted | yes |" in results, results
    assert re.search(r"^- webhooks: jobs that ended without their event delivered: 0;", results,
                     re.M), results
    # the retention ran beside the load, removed originals and lost nothing
    # (the ledger above read every done job's renditions)
    gc = re.search(r"^- imgworker gc: (\d+) runs, (\d+) originals removed, .* (\d+) failed$",
                   results, re.M)
    assert gc and int(gc.group(1)) >= 2 and int(gc.group(2)) > 0 and gc.group(3) == "0", results

    # timing verdicts are shown, never asserted, in a smoke run
    assert results.count("| not judged (smoke) |") == 5, results

    # samples of every process kind, and of everything else sampled
    with open(soak / "samples.json") as handle:
        data = json.load(handle)
    samples = data["samples"]
    assert len(samples) >= 8, f"the soak measured nothing: {len(samples)} samples"
    for kind in KINDS:
        counts = [sum(p["kind"] == kind for p in s["procs"]) for s in samples]
        assert sum(1 for n in counts if n) >= len(samples) // 2, (kind, counts)
        assert all(p["rss"] > 0 and p["fds"] > 0 and p["threads"] > 0
                   for s in samples for p in s["procs"] if p["kind"] == kind), kind
    assert {s["phase"] for s in samples} >= {"steady", "step", "drain"}
    # sockets counted by kind, so that a count that grows says which kind did
    broker_port = f"to port {urllib.parse.urlsplit(amqp_url).port or 5672}"
    assert all(sum(p["socket_kinds"].values()) == p["sockets"]
               for s in samples for p in s["procs"]), samples[-1]
    api = [p for s in samples for p in s["procs"] if p["kind"] == "API worker"]
    assert all(p["socket_kinds"].get("listening") == 1 for p in api), api[-1]
    for kind in ("API worker", "worker"):
        assert any(p["socket_kinds"].get(broker_port) for s in samples for p in s["procs"]
                   if p["kind"] == kind), (kind, samples[-1])
    assert all(s["queue"] is not None and s["metrics_files"] and s["storage_bytes"] > 0
               for s in samples), samples[-1]
    assert all(s["alerts"] is not None for s in samples), "Prometheus's alerts were not read"
    assert sum(s["latency"]["n"] for s in samples) > 0, "no upload-to-done latency measured"
    # a row for each kind in the processes tables
    for kind in KINDS:
        assert re.search(rf"^\| {re.escape(kind)} \| \d+ \| \d+ \|", results, re.M), kind

    # the chart is a PNG
    with open(soak / "chart.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![" in results and "(chart.png)" in results
