"""The benchmarks' smoke run: tiny inputs, one repetition, seconds. It
measures nothing (CI never times anything); it keeps bench/ from rotting,
and checks that what it writes is what README promises."""

import os
import re
import subprocess
import sys

from PIL import Image

from bench import auth, erasure, ingest
from harness.pipeline import REPO


def test_the_bench_smoke_run_writes_its_tables_and_chart(amqp_url, tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "IMGWORKER_TEST_AMQP_URL": amqp_url})
    assert run.returncode == 0, run.stdout + run.stderr
    results = (out / "results.md").read_text()
    assert "**Smoke run**" in results
    for heading in ("## 1. Renditions engine", "## 2. Ingest through nginx", "## 3. End to end",
                    "## 4. Memory", "## 5. Queue types and the cluster", "## 6. Fuzzing identify",
                    "## 7. Auth: what credentials cost ingest", "## 8. Erasure and retention"):
        assert heading in results
    for row in ("| naive Pillow (baseline) |", "| imgworker (images.render",
                "| straightforward design (baseline), multipart |", f"| {ingest.CEILING} |",
                "| 2 |",
                "| one node, classic queue (baseline) |", "| 3-node cluster, quorum queue |",
                "| kill -9 |"):
        assert row in results
    # every ingest design really queued what it accepted
    section_2 = results.split("## 2. Ingest through nginx")[1].split("\n## ")[0]
    counts = re.findall(r"\| (\d+) / (\d+) \|$", section_2, re.M)
    assert len(counts) == 5    # baseline; before, raw and multipart; now, raw and multipart
    for queued, accepted in counts:
        assert int(queued) >= int(accepted) > 0
    # the ceiling answered (and stored nothing, so nothing is queued)
    assert re.search(rf"^\| {re.escape(ingest.CEILING)} \| [1-9]\d* .*\| nothing, by design \|$",
                     results, re.M)
    assert "of the ceiling" in results
    # each drain row also against N engines side by side, and, with a core
    # to spare, against an engine rendering alongside the drain
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \| \d+% .*\| [\d.]+ \| \d+% .*"
                     r"\| [\d.]+ \| \d+% .*\| [\d.]+% .*\|$", results, re.M)
    assert re.search(r"^\| 2 \| [\d.]+ \| [\d.]+ \| \d+% .*\| [\d.]+ \| \d+% .*"
                     r"\| no spare core \| – \| [\d.]+% .*\|$", results, re.M)
    # the auth designs each accepted uploads, refused none (a grant per
    # upload: enough were minted) and queued what they accepted
    for design in (f"imgworker {auth.BEFORE[:7]} (before issue 23), no auth", auth.OFF,
                   auth.KEY, auth.GRANT):
        row = re.search(rf"^\| {re.escape(design)} \| [1-9]\d* .*? \| (\d+) \| (\d+) / (\d+) \|",
                        results, re.M)
        assert row, design
        refused, queued, accepted = map(int, row.groups())
        assert refused == 0 and queued >= accepted > 0, (design, row.group(0))
    assert re.search(r"^POST /grants through nginx with a key .*: [1-9]\d* grants/s, 0 refused",
                     results, re.M)
    assert "| auth: with a fresh grant per upload, >= 90% of auth off's accepted uploads/s |" \
        in results
    # erasure by owner: each store's owner erased through the API, a
    # job.deleted seen for each job erased
    big, small = (erasure.store_name(total) for total in erasure.SMOKE_TOTALS)
    for store in (f"{small} (baseline)", big):
        row = re.search(rf"^\| {re.escape(store)} \| [\d,]+ \| ([\d,]+) "
                        r"\| [\d.]+ \([\d.]+–[\d.]+\) \| \d+ .*\| [\d.]+x "
                        r"\| [\d.]+x \([\d.]+x–[\d.]+x\) \| ([\d,]+) / ([\d,]+) \|$",
                        results, re.M)
        assert row, store
        per_run, events, erased = (int(v.replace(",", "")) for v in row.groups())
        assert per_run > 0 and events == erased == per_run, row.group(0)
    # gc: with nothing expired it removes nothing; with 1% expired it
    # removes their originals and erases the failed jobs among them,
    # announcing each
    for total in erasure.SMOKE_TOTALS:
        name = erasure.store_name(total)
        assert re.search(rf"^\| {re.escape(name)}, 0 expired \| [\d,]+ \| [\d,]+ \| 0 \| 0 "
                         r"\| .*\| 0 / 0 \|$", results, re.M), name
        row = re.search(rf"^\| {re.escape(name)}, 1% \(([\d,]+)\) expired \| [\d,]+ "
                        r"\| [1-9][\d,]* \| ([\d,]+) \| ([\d,]+) \| .*\| (\d+) / (\d+) \|$",
                        results, re.M)
        assert row, name
        expired, originals, failed, events, erased = (int(v.replace(",", ""))
                                                      for v in row.groups())
        assert originals == expired > 0 and events == erased == failed, row.group(0)
    # ingest and drain of the release before, the commit before erasure
    # and the tree as it is: each accepted and queued uploads, and drained
    for design in (*erasure.TREES.values(), erasure.NOW):
        row = re.search(rf"^\| {re.escape(design)} \| [1-9]\d* .*? \| (\d+) \| (\d+) / (\d+) "
                        r"(?:\| [\d.]+ )+\| [\d.]+ \([\d.]+–[\d.]+\) \| [\d.]+x "
                        r"\| [\d.]+x \([\d.]+x–[\d.]+x\) \|$", results, re.M)
        assert row, design
        refused, queued, accepted = map(int, row.groups())
        assert refused == 0 and queued >= accepted > 0, (design, row.group(0))
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800
