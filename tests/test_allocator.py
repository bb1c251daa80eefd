"""allocator.tune: a process sets its role's malloc thresholds itself, so an
upload-sized buffer stays in the heap however the process was started, and
an environment that sets glibc's variables is left to decide."""

import os
import subprocess
import sys

import pytest

from imgworker import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Runs in a fresh process: tune (or not), then allocate a 1.5 MiB buffer
#: and say whether glibc gave it a mapping of its own (rather than the heap).
_PROBE = """
import sys
from imgworker import allocator
tuned = allocator.tune("api") if sys.argv[1] == "tune" else None

def anonymous_mappings():
    found = set()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) == 5:     # no path: anonymous
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= 1_500_000:
                found.add(fields[0])
    return found

before = anonymous_mappings()
buffer = bytearray(1_500_000)
print(tuned, bool(anonymous_mappings() - before))
"""


def _probe(argument, env_extra=None):
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, "-c", _PROBE, argument], cwd=REPO, env=env,
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_the_api_role_keeps_an_upload_sized_buffer_in_the_heap():
    assert _probe("plain") == ["None", "True"]       # glibc's default: mapped, then unmapped
    assert _probe("tune") == ["True", "False"]


def test_an_environment_that_sets_the_thresholds_decides():
    assert _probe("tune", {"MALLOC_MMAP_THRESHOLD_": "131072"}) == ["False", "True"]


def test_the_environment_form_says_the_same_thresholds():
    mmap_threshold, trim_threshold = allocator.THRESHOLDS["render"]
    assert allocator.environment("render") == {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold),
                                               "MALLOC_TRIM_THRESHOLD_": str(trim_threshold)}
