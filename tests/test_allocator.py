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
    assert allocator.environment("api")["MALLOC_ARENA_MAX"] == str(allocator.ARENAS["api"])


#: Runs in a fresh process: tune (or not), then start eight threads, each
#: reading bodies the way the API does (api._read_from_socket: a bytearray
#: grown 64 KiB at a time) and then staying alive, as a pool thread does.
#: Prints the RSS growth from the first thread's to the last's, in bytes.
_THREADS_PROBE = """
import sys, threading
from imgworker import allocator
if sys.argv[1] == "tune":
    allocator.tune("api")

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

def pool_thread():
    for size in (3_600_000, 500_000, 3_200_000, 1_800_000, 350_000):
        body = bytearray()
        while len(body) < size:
            body += b"x" * 65536
        del body
    served.release()
    parked.wait()

served, parked, after = threading.Semaphore(0), threading.Event(), []
for _ in range(8):
    threading.Thread(target=pool_thread, daemon=True).start()
    served.acquire()
    after.append(rss())
print(after[-1] - after[0])
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_the_api_roles_threads_share_what_they_keep():
    """Eight pool threads that each served uploads keep little more than
    the first did (a second arena); with the thresholds alone, each thread
    keeps a heap of bodies of its own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}

    def growth(argument, extra=None):
        result = subprocess.run([sys.executable, "-c", _THREADS_PROBE, argument], cwd=REPO,
                                env={**env, **(extra or {})}, capture_output=True, text=True,
                                check=True)
        return int(result.stdout)

    thresholds_only = growth("plain", {name: value for name, value in
                                       allocator.environment("api").items()
                                       if name != "MALLOC_ARENA_MAX"})
    assert thresholds_only > 7 * 1_400_000          # the fault this guards against
    assert growth("tune") < thresholds_only / 3     # here: 2.6 MB against 14 MB


def test_an_environment_that_sets_the_arenas_decides():
    assert _probe("tune", {"MALLOC_ARENA_MAX": "4"}) == ["False", "True"]
