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

An environment that sets MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_
(glibc reads them at start) has said what it wants, and is left alone.
"""

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

#: mallopt()'s parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: role -> (mmap threshold, trim threshold), in bytes.
THRESHOLDS = {
    # upload bodies up to 2 MiB; the rare larger one is mapped and returned
    "api": (2 * 1024 * 1024, 8 * 1024 * 1024),
    # decoded image planes of tens of MiB, in the renderer child
    "render": (64 * 1024 * 1024, 256 * 1024 * 1024),
}

_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def environment(role):
    """The same thresholds as the environment variables glibc reads at
    start, for a process started with them (the bench's baselines)."""
    mmap_threshold, trim_threshold = THRESHOLDS[role]
    return dict(zip(_ENVIRONMENT, (str(mmap_threshold), str(trim_threshold))))


def tune(role):
    """Set the role's thresholds in this process; before its first large
    allocation, as it applies to blocks allocated from then on. False if
    the environment decides or this libc has no mallopt (not glibc)."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mmap_threshold, trim_threshold = THRESHOLDS[role]
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim_threshold)):
        logger.warning("glibc refused the malloc thresholds of the %s role; running with its "
                       "defaults.", role)
        return False
    return True
