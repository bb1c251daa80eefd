"""glibc's malloc thresholds, set by each process for its role, so that they
hold however it was started (the shipped units, by hand, a container,
another supervisor).

glibc gives a large block its own mmap, zero-filled by the kernel, and
hands it back on free; past the trim threshold it also gives back the top
of the heap. For a process that allocates buffers of the same few sizes
over and over (upload bodies in the API, image planes in the renderer),
that is a page-fault storm per request. Raising both thresholds keeps those
buffers in the heap for the next request. What stays mapped is bounded by
the trim threshold per arena. The effect is measured by the bench, not
asserted here.

glibc also gives each new thread an arena of its own, up to eight per core.
The API's pool threads each handle uploads, so each would keep a heap of
bodies: the soak's hour (bench/results/soak, 2026-12-02) saw an API process
grow 4 MB with each pool thread it started. Its threads spend their time
waiting on the disk and the broker, not in malloc, so two arenas serve them
all and bound what stays mapped to twice the trim threshold.

An environment that sets MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
MALLOC_ARENA_MAX (glibc reads them at start) has said what it wants, and is
left alone.
"""

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

#: mallopt()'s parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: role -> (mmap threshold, trim threshold), in bytes.
THRESHOLDS = {
    # upload bodies up to 2 MiB; the rare larger one is mapped and returned
    "api": (2 * 1024 * 1024, 8 * 1024 * 1024),
    # decoded image planes of tens of MiB, in the renderer child
    "render": (64 * 1024 * 1024, 256 * 1024 * 1024),
}

#: role -> most arenas, for a role with threads; None: glibc's default.
ARENAS = {
    "api": 2,
    "render": None,     # one thread
}

_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def _settings(role):
    """[(mallopt parameter, environment variable, value)] of a role."""
    mmap_threshold, trim_threshold = THRESHOLDS[role]
    settings = [(_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", mmap_threshold),
                (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", trim_threshold)]
    if ARENAS[role] is not None:
        settings.append((_M_ARENA_MAX, "MALLOC_ARENA_MAX", ARENAS[role]))
    return settings


def environment(role):
    """The same settings as the environment variables glibc reads at
    start, for a process started with them (the bench's baselines)."""
    return {name: str(value) for _, name, value in _settings(role)}


def tune(role):
    """Set the role's settings in this process; before its first large
    allocation and its first thread, as they apply from then on. False if
    the environment decides or this libc has no mallopt (not glibc)."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if not all(mallopt(parameter, value) for parameter, _, value in _settings(role)):
        logger.warning("glibc refused the malloc settings of the %s role; running with its "
                       "defaults.", role)
        return False
    return True
