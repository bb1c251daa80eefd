"""What the unit files must give the options: one table of the limits a
unit sets and the options each must outlast or outgrow.

A unit cannot read config.ini, and an option cannot reach into a unit; so
each pair is written down once, here. ``imgworker check-config`` warns when
an option has outgrown its unit (``violations``), and
tests/test_shipped_files.py holds the shipped units to every pair at the
default config.

The unit's value is what systemd would use: under systemd, ``systemctl
show`` (drop-ins included); off systemd, or when systemctl cannot say, the
unit file (the admin's copy in /etc, else the package's, else a checkout's
systemd/) and the drop-ins under /etc and /run in name order.
"""

import math
import os
import re
import subprocess
import typing

#: After its render ends, a stopping worker still makes that job's
#: renditions and record durable -- and, with prefetch 2, those of the job
#: before it, which the finish thread may still be writing -- then waits for
#: the broker to confirm the job's event, acks, and gives the renderer a few
#: seconds to exit. Those are fsyncs (slow on busy or network storage) and
#: round trips, not rendering: a fixed margin over job_timeout covers them.
WORKER_STOP_MARGIN = 30

#: The worker's cgroup holds more than the render that max_render_memory
#: bounds: the worker process itself (Python, pika, Pillow), the renderer's
#: code, libraries and stack, which RLIMIT_DATA does not count, and the page
#: cache of the renditions being written, which the cgroup is charged for.
#: None of these grows with the image, so a fixed margin covers them; the
#: bench's memory figures say how much of it they use.
WORKER_OWN_MEMORY_MIB = 256

#: gunicorn's graceful_timeout (server.py gives gunicorn this; the API
#: unit's TimeoutStopSec is derived from it): on SIGTERM the arbiter gives
#: its workers this long to finish the uploads in flight, then kills them.
API_GRACEFUL_TIMEOUT = 30

#: An API process besides the upload bodies it holds ([api]
#: max_body_memory): Python, pika, Pillow, a request's small buffers. The
#: arbiter needs about as much. tests/faults/test_api_memory.py measures
#: 32 maximum-size uploads at once against the sum.
API_OWN_MEMORY_MIB = 96

#: What the arbiter needs after graceful_timeout: kill its workers, reap
#: them, exit.
API_STOP_MARGIN = 10

#: A stopping webhook sender lets the POST in flight end. [webhook] timeout
#: bounds the whole POST -- connecting, sending, the answer -- by one
#: deadline (webhook.post cuts the connection there); after it the sender
#: hands the event back, closes its channel and connection, and exits:
#: round trips to the broker, which this margin covers.
WEBHOOK_STOP_MARGIN = 5


class Pair(typing.NamedTuple):
    """One unit directive and the least value the config asks of it."""
    unit: str        # as 'systemctl edit' takes it
    directive: str   # TimeoutStopSec | MemoryMax
    options: tuple   # ((section, option), ...) the rule reads
    rule: str        # how the least value is made, for a person
    least: object    # config -> seconds (TimeoutStopSec) or bytes (MemoryMax)
    below: str       # what happens when the unit's value is below it


PAIRS = (
    Pair("imgworker@.service", "TimeoutStopSec", (("worker", "job_timeout"),),
         f"job_timeout + {WORKER_STOP_MARGIN} s to make the jobs in hand durable",
         lambda config: config.worker.job_timeout + WORKER_STOP_MARGIN,
         "every stop and upgrade SIGKILLs a job still rendering, and it costs an attempt"),
    Pair("imgworker@.service", "MemoryMax", (("worker", "max_render_memory"),),
         f"max_render_memory + {WORKER_OWN_MEMORY_MIB} MiB for the worker's own needs",
         lambda config: (config.worker.max_render_memory + WORKER_OWN_MEMORY_MIB) << 20,
         "an image the renderer is allowed meets the OOM killer instead of failing "
         "with 'needs more than N MiB'"),
    Pair("imgworker-webhook.service", "TimeoutStopSec", (("webhook", "timeout"),),
         f"[webhook] timeout (the POST in flight) + {WEBHOOK_STOP_MARGIN} s to hand its "
         "event back",
         lambda config: config.webhook.timeout + WEBHOOK_STOP_MARGIN,
         "a stop SIGKILLs the sender mid-POST and the unit ends failed"),
    Pair("imgworker-api.service", "TimeoutStopSec", (),
         f"gunicorn's graceful_timeout ({API_GRACEFUL_TIMEOUT} s) + {API_STOP_MARGIN} s",
         lambda config: API_GRACEFUL_TIMEOUT + API_STOP_MARGIN,
         "a stop SIGKILLs the API while it still finishes uploads in flight"),
    Pair("imgworker-api.service", "MemoryMax", (("api", "workers"), ("api", "max_body_memory")),
         f"workers x (max_body_memory + {API_OWN_MEMORY_MIB} MiB), and {API_OWN_MEMORY_MIB} MiB "
         "for the arbiter",
         lambda config: (config.api.workers * (config.api.max_body_memory + API_OWN_MEMORY_MIB)
                         + API_OWN_MEMORY_MIB) << 20,
         "legal uploads meet the OOM killer, which ends an API process and every upload on it"),
)


class Violation(typing.NamedTuple):
    pair: Pair
    least: float     # seconds or bytes
    value: float     # the unit's, same unit; math.inf for infinity
    source: str      # where the unit's value came from


# -- the values of the directives --------------------------------------------

_SECONDS = {"us": 1e-6, "usec": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "msec": 1e-3,
            "s": 1, "sec": 1, "second": 1, "seconds": 1,
            "m": 60, "min": 60, "minute": 60, "minutes": 60,
            "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
            "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800,
            "weeks": 604800, "M": 2629800, "month": 2629800, "months": 2629800,
            "y": 31557600, "year": 31557600, "years": 31557600}
_TIMESPAN_PART = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Zµμ]*)")


def parse_seconds(text):
    """A systemd time span ('90', '2min 30s', 'infinity') in seconds."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    if re.fullmatch(r"\d+(\.\d*)?", text):
        return float(text)
    total, position = 0.0, 0
    while position < len(text):
        match = _TIMESPAN_PART.match(text, position)
        if not match or match.group(2) not in _SECONDS:
            raise ValueError(f"not a time span: {text!r}")
        total += float(match.group(1)) * _SECONDS[match.group(2)]
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    return total


def parse_bytes(text):
    """A systemd memory limit ('1G', '1073741824', '50%', 'infinity') in bytes."""
    text = text.strip()
    if text == "infinity":
        return math.inf
    if text.endswith("%"):
        return float(text[:-1]) / 100 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGTPE]?)", text)
    if not match:
        raise ValueError(f"not a memory size: {text!r}")
    return float(match.group(1)) * 1024 ** " KMGTPE".index(match.group(2) or " ")


def _format_seconds(seconds):
    return "infinity" if seconds == math.inf else f"{math.ceil(seconds)}s"


def _format_bytes(size):
    if size == math.inf:
        return "infinity"
    mib = math.ceil(size / (1 << 20))
    return f"{mib >> 10}G" if mib % 1024 == 0 else f"{mib}M"


class _Directive(typing.NamedTuple):
    show: str        # its property in 'systemctl show'
    empty: float     # what an empty assignment (reset) means
    parse: object
    format: object


#: An empty TimeoutStopSec= falls back to systemd's DefaultTimeoutStopSec
#: (90 s unless system.conf says otherwise); an empty MemoryMax= lifts it.
_DIRECTIVES = {
    "TimeoutStopSec": _Directive("TimeoutStopUSec", 90.0, parse_seconds, _format_seconds),
    "MemoryMax": _Directive("MemoryMax", math.inf, parse_bytes, _format_bytes),
}

#: Where a unit file is looked for, first found wins: the admin's full copy,
#: the package's, then the systemd/ of a checkout (a laptop, script/up
#: --checkout).
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system",
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd"))
#: Where its drop-ins (<unit>.d/*.conf) are looked for.
DROP_IN_DIRS = ("/etc/systemd/system", "/run/systemd/system")


def _instance(unit):
    """The name systemctl can load: a template's instance 1."""
    return unit.replace("@.", "@1.")


def _systemctl(*args):
    """systemctl's output, or None off systemd or when it fails."""
    if not os.path.isdir("/run/systemd/system"):
        return None
    try:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _from_systemctl(unit):
    """{directive: (value, source)} as systemd has the unit loaded, or None."""
    name = _instance(unit)
    properties = ["LoadState"] + [spec.show for spec in _DIRECTIVES.values()]
    output = _systemctl("show", *(f"--property={p}" for p in properties), name)
    if output is None:
        return None
    shown = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    if shown.get("LoadState") != "loaded":
        return None
    try:
        return {directive: (spec.parse(shown[spec.show]), f"systemctl show {name}")
                for directive, spec in _DIRECTIVES.items()}
    except (KeyError, ValueError):
        return None


def _assignments(path):
    """(key, value) of the [Service] section of a unit file or drop-in."""
    with open(path, encoding="utf-8") as handle:
        text = re.sub(r"\\\n", " ", handle.read())
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            yield key.strip(), value.strip()


def _from_files(unit):
    """{directive: (value, source)} from the unit file and its drop-ins, or
    None if the unit file is nowhere."""
    found = [os.path.join(d, unit) for d in UNIT_DIRS if os.path.isfile(os.path.join(d, unit))]
    if not found:
        return None
    drop_ins = {}
    for directory in DROP_IN_DIRS:
        for name in dict.fromkeys((unit, _instance(unit))):
            folder = os.path.join(directory, name + ".d")
            if os.path.isdir(folder):
                for conf in sorted(os.listdir(folder)):
                    # A later directory's file of the same name overrides.
                    if conf.endswith(".conf") and conf not in drop_ins:
                        drop_ins[conf] = os.path.join(folder, conf)
    values = {directive: (spec.empty, "systemd's default") for directive, spec in _DIRECTIVES.items()}
    for path in [found[0]] + [drop_ins[name] for name in sorted(drop_ins)]:
        for key, raw in _assignments(path):
            # TimeoutSec= sets the start and the stop timeout.
            directive = "TimeoutStopSec" if key == "TimeoutSec" else key
            spec = _DIRECTIVES.get(directive)
            if spec is not None:
                try:
                    values[directive] = (spec.parse(raw) if raw else spec.empty, path)
                except ValueError:
                    pass   # systemd ignores a value it cannot parse, and so do we
    return values


def unit_values(unit):
    """{directive: (value, source)} for ``unit`` as systemd would run it, or
    None if it is not installed here (nor in a checkout)."""
    return _from_systemctl(unit) or _from_files(unit)


def violations(config):
    """The pairs whose unit value is below what ``config`` needs."""
    found, loaded = [], {}
    for pair in PAIRS:
        if pair.unit not in loaded:
            loaded[pair.unit] = unit_values(pair.unit)
        if loaded[pair.unit] is None:
            continue
        value, source = loaded[pair.unit][pair.directive]
        least = pair.least(config)
        if value < least:
            found.append(Violation(pair, least, value, source))
    return found


def describe(violation, config):
    """One line: the option and its value, the directive and its value,
    what goes wrong, and the drop-in that fixes it."""
    pair, fmt = violation.pair, _DIRECTIVES[violation.pair.directive].format
    options = " and ".join(f"[{section}] {option} = {getattr(getattr(config, section), option):g}"
                           for section, option in pair.options) or "imgworker"
    return (f"{options} needs {pair.directive}={fmt(violation.least)} or more on {pair.unit} "
            f"({pair.rule}), which has {pair.directive}={fmt(violation.value)} "
            f"({violation.source}): {pair.below}. Fix it with a drop-in: 'systemctl edit "
            f"{pair.unit}', add '[Service]' and '{pair.directive}={fmt(violation.least)}', "
            "then restart the units.")
