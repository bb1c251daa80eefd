"""The fuzzer at length (issue 22): thousands of harness/hostile.py files per
format through ``images.identify``, with hypothesis's own search (not
derandomized: each run looks somewhere new), measured by harness/hostile.py's
probe. tests/test_fuzz.py runs a fixed budget of the same property; this
reports what a longer search saw: examples run, the slowest input, the
largest memory, and any input that broke the property, shrunk.
"""

import os
import typing

from hypothesis import HealthCheck, given, settings

from harness import hostile
from harness.hostile import IDENTIFY_BYTES, IDENTIFY_SECONDS
from imgworker import config, images

#: Examples per format: a longer search than the test suite's 200.
EXAMPLES, SMOKE_EXAMPLES = 5000, 10
#: How many of an input's first bytes the report shows.
_HEAD = 16


class Extreme(typing.NamedTuple):
    value: float       # ms or MB
    head: str          # hex of the input's first bytes
    size: int          # bytes


class FormatRun(typing.NamedTuple):
    examples: int
    accepted: int
    refused: int
    slowest: Extreme
    largest: Extreme
    failure: typing.Optional[str]     # the shrunk failing input and what happened


def _extreme(value, data):
    return Extreme(value, data[:_HEAD].hex(), len(data))


def _search(probe, strategy, examples):
    seen = {"examples": 0, "ok": 0, "refused": 0,
            "slowest": Extreme(0.0, "", 0), "largest": Extreme(0.0, "", 0), "failing": None}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def search(data):
        outcome = probe.identify(data)
        seen["examples"] += 1
        if outcome.answered():
            seen[outcome.kind] += 1
        if outcome.seconds * 1000 > seen["slowest"].value:
            seen["slowest"] = _extreme(outcome.seconds * 1000, data)
        if outcome.peak_bytes / 1e6 > seen["largest"].value:
            seen["largest"] = _extreme(outcome.peak_bytes / 1e6, data)
        broken = (not outcome.answered() or outcome.seconds > IDENTIFY_SECONDS
                  or outcome.peak_bytes > IDENTIFY_BYTES)
        if broken:    # hypothesis replays the shrunk input last: the last one kept
            seen["failing"] = (f"{len(data)} bytes starting {data[:32].hex()}: {outcome.kind}, "
                               f"{outcome.seconds * 1000:.0f} ms, "
                               f"{outcome.peak_bytes / 1e6:.1f} MB ({outcome.detail})")
        assert not broken

    try:
        search()
    except AssertionError:
        pass
    return FormatRun(seen["examples"], seen["ok"], seen["refused"], seen["slowest"],
                     seen["largest"], seen["failing"])


def run(smoke, log=print):
    """{"formats": {format: FormatRun}, "findings": {name: hostile.Outcome}}."""
    limits = images.Limits.from_config(config.load(os.devnull))
    probe = hostile.Probe(limits)
    try:
        formats = {}
        for fmt, strategy in hostile.STRATEGIES.items():
            formats[fmt] = found = _search(probe, strategy, SMOKE_EXAMPLES if smoke else EXAMPLES)
            log(f"  {fmt}: {found.examples} examples, slowest {found.slowest.value:.1f} ms, "
                f"largest {found.largest.value:.1f} MB"
                + (f"; FAILED: {found.failure}" if found.failure else ""))
        findings = {name: probe.identify(build()) for name, build in hostile.FINDINGS.items()}
        for name, outcome in findings.items():
            log(f"  issue 22 finding {name}: {outcome.kind}, {outcome.seconds * 1000:.0f} ms, "
                f"{outcome.peak_bytes / 1e6:.1f} MB")
    finally:
        probe.close()
    return {"formats": formats, "findings": findings}
