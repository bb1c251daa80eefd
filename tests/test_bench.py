"""The benchmarks' smoke run: tiny inputs, one repetition, seconds. It
measures nothing (CI never times anything); it keeps bench/ from rotting,
and checks that what it writes is what README promises."""

import os
import re
import subprocess
import sys

from PIL import Image

from bench import auth, ingest
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
                    "## 7. Auth: what credentials cost ingest"):
        assert heading in results
    for row in ("| naive Pillow (baseline) |", "| imgworker (images.render",
                "| straightforward design (baseline), multipart |", f"| {ingest.CEILING} |",
                "| 2 |",
                "| one node, classic queue (baseline) |", "| 3-node cluster, quorum queue |",
                "| kill -9 |"):
        assert row in results
    # every ingest design really queued what it accepted
    counts = re.findall(r"\| (\d+) / (\d+) \|$", results, re.M)
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
    with Image.open(out / "chart.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800
