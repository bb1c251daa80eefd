"""imgworker's configuration: one schema, one file, errors that say where.

Every option lives in ``SCHEMA`` with its default, its type and a help line.
The shipped ``/etc/imgworker/config.ini`` is generated from it (``imgworker
check-config --template``), so the file, the code and the docs cannot drift.

``[renditions]`` is the one open section: its option names are the rendition
names a deployment chooses, each value ``WIDTHxHEIGHT MODE FORMAT QUALITY``.
When the file has that section it replaces the default set entirely, so a
rendition can be removed as well as added.
"""

import configparser
import ipaddress
import os
import re
import textwrap
import urllib.parse
from dataclasses import dataclass
from types import SimpleNamespace

from . import formats

#: Where the Debian package installs the file; ``IMGWORKER_CONFIG`` or
#: ``--config`` point elsewhere (tests, a laptop).
DEFAULT_PATH = "/etc/imgworker/config.ini"

#: Formats the API can identify from their magic bytes (see images.sniff).
KNOWN_FORMATS = formats.UPLOAD_FORMATS


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, section,
    option and value, so the person reading the journal can fix it."""


# -- value types ------------------------------------------------------------
# Each parser takes the raw string and returns the typed value or raises
# ValueError with a reason; _load() adds the where.

def _positive_int(raw):
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _seconds(raw):
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a number of seconds above 0")
    return value


def split_urls(raw):
    """The URLs of a [broker] url value: one, or several separated by commas."""
    return [url.strip() for url in raw.split(",") if url.strip()]


def _amqp_urls(raw):
    urls = split_urls(raw)
    if not urls:
        return ""      # not configured: the services refuse to start (see cli)
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("must be an amqp:// or amqps:// URL with a host "
                             "(or several, separated by commas)")
    # The nodes of one cluster: the services connect to whichever answers,
    # so each URL must reach the same vhost as the same user.
    logins = {(parts.username, parts.password, parts.path)
              for parts in map(urllib.parse.urlsplit, urls)}
    if len(logins) > 1:
        raise ValueError("several URLs must all name the same user, password and vhost")
    return ", ".join(urls)


def _absolute_path(raw):
    if not os.path.isabs(raw):
        raise ValueError("must be an absolute path")
    return os.path.normpath(raw)


def _listen(raw):
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8000")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError("HOST must be an IP address or localhost") from None
    return raw


def _formats(raw):
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in KNOWN_FORMATS]
    if unknown or not names:
        raise ValueError("must be a comma-separated list of " + ", ".join(KNOWN_FORMATS))
    return tuple(names)


def _webhook_url(raw):
    if raw:
        parts = urllib.parse.urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host (or empty: off)")
    return raw


def _queue_type(raw):
    if raw not in ("classic", "quorum"):
        raise ValueError("must be classic or quorum")
    return raw


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """Seconds in "90", "90s", "15m", "12h" or "7d"."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 12h, 7d)") from None
    if seconds < 0:
        raise ValueError(f"{text!r}: a duration is not negative")
    return seconds


def _retention(raw):
    """Seconds, or None for forever."""
    if raw.strip().lower() == "forever":
        return None
    seconds = parse_duration(raw)
    if not seconds > 0:
        raise ValueError("must be a duration above 0 (90s, 15m, 12h, 30d) or forever")
    return seconds


def _boolean(raw):
    value = raw.lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def _origins(raw):
    """Web origins, scheme://host[:port], separated by commas or spaces."""
    origins = []
    for origin in re.split(r"[\s,]+", raw.strip()):
        if not origin:
            continue
        parts = urllib.parse.urlsplit(origin)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path or parts.query or parts.fragment or parts.username):
            raise ValueError(f"{origin!r} is not an origin like https://app.example or "
                             "http://localhost:3000 (no path, no trailing slash)")
        origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(origins)


def _name(raw):
    if not raw:
        raise ValueError("must not be empty")
    return raw


@dataclass(frozen=True)
class Option:
    default: str
    parse: object
    help: str


SCHEMA = {
    "broker": {
        # No default: a default URL would be guest on vhost '/', which a
        # service must never end up using by accident.
        "url": Option("", _amqp_urls,
                      "AMQP URL of the RabbitMQ vhost, e.g. amqp://USER:PASSWORD@HOST:5672/VHOST "
                      "(%2F is the vhost '/'). 'imgworker setup-broker' creates a vhost and user "
                      "on the local RabbitMQ and writes this to config.d/broker.ini, which is "
                      "read after this file. The API and the workers refuse to start without it. "
                      "For a RabbitMQ cluster, the URL of each node, separated by commas (same "
                      "user, password and vhost): each connection goes to one that answers."),
        "queue": Option("imgworker.jobs", _name,
                        "Durable queue the API publishes jobs to and workers consume."),
        "dead_letter_queue": Option("imgworker.jobs.dead", _name,
                                    "Where jobs that failed for good are kept for a person to look at."),
        "queue_type": Option("classic", _queue_type,
                             "classic: the job queue and the dead-letter queue live on one "
                             "node. quorum: both are replicated over a cluster's nodes (Raft); "
                             "dead-lettering is at-least-once and RabbitMQ's delivery limit "
                             "backs up the attempt count. A new install's config.d/broker.ini "
                             "says quorum; without it, classic, as older installs declared. "
                             "RabbitMQ refuses to redeclare a queue as another type: to change "
                             "it on a running system, stop the API and workers and run "
                             "'imgworker migrate-queues'."),
        "prefetch": Option("2", _positive_int,
                           "Unacknowledged jobs a worker holds at once. With 2, the next "
                           "job is rendered while the last one's files are written and its "
                           "event and ack go out, so the renderer does not wait for the disk "
                           "and the broker between jobs; 1 spreads a short queue more evenly "
                           "over many workers."),
        "heartbeat": Option("60", _positive_int,
                            "AMQP heartbeat in seconds; a dead peer is noticed after about twice this."),
        "timeout": Option("3", _seconds,
                          "Seconds to wait for the broker (connect, blocked by an alarm, confirms) "
                          "before the API answers 503."),
    },
    "storage": {
        "root": Option("/var/lib/imgworker", _absolute_path,
                       "Originals, renditions and job state live below this directory."),
        "metrics_dir": Option("/run/imgworker/metrics", _absolute_path,
                              "Where every imgworker process on this host (API, workers, "
                              "webhook sender) keeps its Prometheus counters, for GET /metrics "
                              "to add up. One file per process slot, reused by the next "
                              "process, so the directory does not grow with restarts and "
                              "counters never go down. Local to the host, never the shared "
                              "storage; created if missing (the units' RuntimeDirectory= "
                              "makes the default)."),
    },
    "api": {
        "listen": Option("127.0.0.1:8000", _listen,
                         "Address the API listens on; nginx proxies to it."),
        "workers": Option("4", _positive_int,
                          "Gunicorn worker processes of the API. Each has a Python "
                          "interpreter lock of its own, so processes, not threads, put "
                          "more than one core to work on uploads (bench/results in the "
                          "source tree compares the choices)."),
        "threads": Option("8", _positive_int,
                          "Uploads each API process handles at once. The uploads stored "
                          "at once share one sync of the storage, and their messages "
                          "one wait for the broker's confirms, instead of queueing. "
                          "Each process starts all its threads before its first upload, "
                          "so its threads and memory are the same from its start."),
        "max_body_memory": Option("100", _positive_int,
                                  "Mebibytes of upload bodies one API process holds at once. "
                                  "An upload that would go past it is answered 503 with "
                                  "Retry-After before its body is read (one upload is always "
                                  "taken), so 32 large uploads at once cannot outgrow the "
                                  "memory limit. imgworker-api.service's MemoryMax must hold "
                                  "workers x (this + what a process needs besides) "
                                  "('imgworker check-config' warns, and prints the drop-in "
                                  "that fixes it)."),
        "body_timeout": Option("30", _seconds,
                               "Seconds the API waits for more of an upload's body before it "
                               "answers 408 and closes the connection, freeing the thread. "
                               "nginx cuts off its clients after the same 30 s "
                               "(client_body_timeout) and hands the API whole bodies, so "
                               "this only stops a client that reaches the API directly."),
        "max_upload_bytes": Option("26214400", _positive_int,
                                   "Largest accepted upload body in bytes (413 above); nginx's "
                                   "client_max_body_size must match."),
        "max_pixels": Option("50000000", _positive_int,
                             "Largest accepted width x height of an upload (422 above)."),
        "max_dimension": Option("20000", _positive_int,
                                "Largest accepted width or height in pixels (422 above)."),
        "formats": Option(", ".join(KNOWN_FORMATS), _formats,
                          "Accepted image formats, identified from the bytes (415 otherwise)."),
        "requeue_after": Option("120", _seconds,
                                "Seconds after which 'imgworker sweep' queues an upload whose "
                                "API process died before the broker confirmed it (or drops one "
                                "that was never accepted)."),
        "retry_after": Option("5", _positive_int,
                              "Seconds sent in Retry-After with a 503 when the broker is unavailable."),
    },
    "worker": {
        "max_attempts": Option("3", _positive_int,
                               "Deliveries of one job, crashes included, before it is dead-lettered."),
        "retry_delay": Option("5", _seconds,
                              "Seconds to wait before handing a transiently failed job back."),
        "job_timeout": Option("120", _seconds,
                              "Seconds one job may take to render; past that it fails for good, "
                              "so one input cannot hold a worker. A stopping worker finishes "
                              "the jobs in hand, so the TimeoutStopSec of imgworker@.service "
                              "must be longer ('imgworker check-config' warns, and prints "
                              "the drop-in that fixes it)."),
        "max_render_memory": Option("768", _positive_int,
                                    "Mebibytes one render may use. An image whose decoding "
                                    "needs more by its header (a huge WebP) is refused, with "
                                    "422 at upload; the renderer process is held to this "
                                    "(RLIMIT_DATA), so an image that needs more anyway fails "
                                    "its job with that reason instead of meeting the OOM killer. "
                                    "imgworker@.service's MemoryMax must be larger by what the "
                                    "worker needs besides the render ('imgworker check-config' "
                                    "warns, and prints the drop-in that fixes it)."),
        "stall_timeout": Option("300", _seconds,
                                "Seconds a job may go without progress before the worker stops "
                                "feeding the systemd watchdog, which then restarts it."),
    },
    "auth": {
        "required": Option("true", _boolean,
                           "Whether POST /upload needs credentials: an API key (imgworker "
                           "keys add) or an upload grant. A fresh install requires them. An "
                           "install upgraded from a version before keys keeps accepting "
                           "uploads without them, through config.d/auth.ini, which says "
                           "false (see NEWS.Debian); each API start logs a warning while "
                           "it does."),
        "keys_file": Option("/etc/imgworker/keys.json", _absolute_path,
                            "The API keys, as SHA-256 hashes with their names and scopes; "
                            "the keys themselves are printed once, by 'imgworker keys add', "
                            "and stored nowhere. Mode 0640 root:imgworker. A running API "
                            "sees keys added or revoked within a second, with no restart."),
        "grant_secrets_file": Option("/etc/imgworker/grant-secrets.json", _absolute_path,
                                     "The secrets upload grants are signed with (HMAC-SHA256), "
                                     "mode 0640 root:imgworker. 'imgworker grant-secret rotate' "
                                     "signs new grants with a new one and keeps the old ones "
                                     "until every grant they signed has expired. Every API host "
                                     "sharing the storage needs the same file."),
        "max_grant_ttl": Option("900", _seconds,
                                "Longest lifetime, in seconds, of an upload grant; a longer "
                                "ttl asked for is cut to this. A grant is good for one "
                                "upload: 15 minutes is time for a person to pick a photo."),
        "cors_origins": Option("", _origins,
                               "Origins (https://app.example, comma-separated) whose web pages "
                               "may upload from the browser with a grant: they get "
                               "Access-Control-Allow-Origin on /upload and /jobs. Empty: no "
                               "page of another origin may."),
    },
    "retention": {
        "originals": Option("30d", _retention,
                            "How long an upload's original is kept after its job ends "
                            "(90s, 15m, 12h, 30d, or forever). Originals are the copies "
                            "with the camera's EXIF, GPS position included, and nothing "
                            "serves them: the renditions are what the app shows. 30 days "
                            "leaves time to replay a failed job or render a new rendition "
                            "set; after that only the renditions stay, and GET /jobs/<id> "
                            "says the original was removed."),
        "renditions": Option("forever", _retention,
                             "How long a done job's renditions and record are kept after it "
                             "ended. forever: they are what the app serves, and it erases "
                             "a person's photos when asked (DELETE /owners/<owner>/jobs); "
                             "set a period if the app's own policy has one."),
        "failed": Option("30d", _retention,
                         "How long a failed job's original and record are kept after it "
                         "failed: time for a person to look at why and replay it."),
    },
    "webhook": {
        "url": Option("", _webhook_url,
                      "http:// or https:// URL that 'imgworker webhook' (imgworker-webhook."
                      "service) POSTs every job.done and job.failed event to, signed with "
                      "secret. Empty: webhooks are off. Only this URL is ever called: no "
                      "callback address is taken from a client."),
        "secret": Option("", str,
                         "Shared secret of the Imgworker-Signature header: t=<unix seconds>,"
                         "v1=<hex HMAC-SHA256 of '<t>.<body>'>. Required with url. Keep it out "
                         "of this world-readable file: in config.d/webhook.ini, mode 0640 "
                         "root:imgworker, as broker.ini is."),
        "max_attempts": Option("8", _positive_int,
                               "Attempts to deliver one event (connection errors, timeouts, "
                               "408, 429 and 5xx are retried) before it goes to "
                               "imgworker.webhooks.dead."),
        "retry_delay": Option("5", _seconds,
                              "Seconds before the first retry; each next one waits twice as "
                              "long, up to 10 minutes."),
        "timeout": Option("10", _seconds,
                          "Seconds one POST may take as a whole: connecting, sending the "
                          "event and reading the answer. A stopping sender lets its POST "
                          "end, so imgworker-webhook.service's TimeoutStopSec must cover "
                          "this plus 5 s ('imgworker check-config' warns)."),
    },
}

#: The renditions a fresh install makes; [renditions] in the file replaces them.
DEFAULT_RENDITIONS = {
    "large": "1600x1600 fit jpeg 85",
    "medium": "800x800 fit jpeg 85",
    "thumb": "200x200 fill jpeg 80",
}

RENDITION_MODES = ("fit", "fill")
RENDITION_FORMATS = formats.OUTPUT_FORMATS
_RENDITION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_RENDITION_VALUE = re.compile(r"(\d+)x(\d+)\s+(\w+)\s+(\w+)\s+(\d+)")


@dataclass(frozen=True)
class Rendition:
    """One output a job makes: a box, how the image meets it, how it is saved."""
    name: str
    width: int
    height: int
    mode: str      # fit: inside the box; fill: cover the box, centre crop
    format: str    # one of RENDITION_FORMATS
    quality: int   # 1..100; ignored by a lossless format

    @property
    def extension(self):
        return formats.output_format(self.format).extension


def parse_rendition(name, raw):
    if not _RENDITION_NAME.fullmatch(name):
        raise ValueError("a rendition name is lower-case letters, digits, '-' and '_'")
    match = _RENDITION_VALUE.fullmatch(raw.strip().lower())
    if not match:
        raise ValueError("must be WIDTHxHEIGHT MODE FORMAT QUALITY, e.g. 1600x1600 fit jpeg 85")
    width, height, mode, fmt, quality = match.groups()
    width, height, quality = int(width), int(height), int(quality)
    if not (0 < width <= 10000 and 0 < height <= 10000):
        raise ValueError("width and height must be between 1 and 10000")
    if mode not in RENDITION_MODES:
        raise ValueError("MODE must be one of " + ", ".join(RENDITION_MODES))
    if fmt not in RENDITION_FORMATS:
        raise ValueError("FORMAT must be one of " + ", ".join(RENDITION_FORMATS))
    if not 1 <= quality <= 100:
        raise ValueError("QUALITY must be between 1 and 100")
    return Rendition(name, width, height, mode, fmt, quality)


class Config(SimpleNamespace):
    """Typed settings: ``config.broker.url``, ``config.renditions`` (a tuple
    of Rendition), ``config.path`` (the file they came from, or None),
    ``config.origins`` ({(section, option): the file that set it, or
    "<built-in defaults>"})."""

    def origin(self, section, option):
        return self.origins[(section, option)]


def read_raw(path):
    """One file's sections and options as configparser reads them, not yet
    checked against the schema."""
    # No interpolation: broker URLs carry %2F and passwords may carry '%'.
    parser = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ConfigError(f"{path}: cannot be read: {error.strerror}") from None
    except configparser.Error as error:
        raise ConfigError(f"{path}: {error.message}") from None
    return parser


def load(path=None):
    """Read and validate the config file, then the drop-ins beside it.

    Drop-ins are ``config.d/*.ini`` next to the file, read in name order,
    each overriding what came before; the Debian package keeps the broker
    credentials it generates in one (config.d/broker.ini), so config.ini
    stays a conffile the package never edits. A path given explicitly
    (argument or IMGWORKER_CONFIG) must exist; the default path may be
    absent, and then the built-in defaults apply.
    """
    explicit = path or os.environ.get("IMGWORKER_CONFIG")
    path = explicit or DEFAULT_PATH
    files = []
    try:
        files.append((path, read_raw(path)))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
    drop_ins = os.path.join(os.path.dirname(path), "config.d")
    if os.path.isdir(drop_ins):
        for name in sorted(os.listdir(drop_ins)):
            if name.endswith(".ini"):
                files.append((os.path.join(drop_ins, name), read_raw(os.path.join(drop_ins, name))))
    return _build(files, path if files and files[0][0] == path else None)


def _build(files, path):
    """Merge [(where, parser)] in order, checking each file's sections and
    options against the schema, then type every value."""
    raw = {section: {option: (spec.default, "<built-in defaults>")
                     for option, spec in options.items()}
           for section, options in SCHEMA.items()}
    raw_renditions = {name: (value, "<built-in defaults>")
                      for name, value in DEFAULT_RENDITIONS.items()}
    for where, parser in files:
        for section in parser.sections():
            if section == "renditions":
                # An empty [renditions] (the shipped file: every line
                # commented) keeps what came before; a non-empty one is the
                # whole set.
                if parser.options(section):
                    raw_renditions = {name: (value, where)
                                      for name, value in parser[section].items()}
                continue
            if section not in SCHEMA:
                raise ConfigError(f"{where}: unknown section [{section}]; known sections: "
                                  f"{', '.join(list(SCHEMA) + ['renditions'])}")
            for option, value in parser[section].items():
                if option not in SCHEMA[section]:
                    raise ConfigError(f"{where}: [{section}] unknown option '{option}'; "
                                      f"known options: {', '.join(SCHEMA[section])}")
                raw[section][option] = (value, where)

    sections = {}
    for section, options in SCHEMA.items():
        values = {}
        for option, spec in options.items():
            value, where = raw[section][option]
            try:
                values[option] = spec.parse(value.strip())
            except ValueError as error:
                raise ConfigError(f"{where}: [{section}] {option} = {value!r}: {error}") from None
        sections[section] = SimpleNamespace(**values)
    origins = {(section, option): where for section, options in raw.items()
               for option, (_value, where) in options.items()}
    renditions = []
    for name, (value, where) in raw_renditions.items():
        try:
            renditions.append(parse_rendition(name, value))
        except ValueError as error:
            raise ConfigError(f"{where}: [renditions] {name} = {value!r}: {error}") from None
    return Config(path=path, renditions=tuple(renditions), origins=origins, **sections)


def from_dict(values):
    """Build a Config from {section: {option: raw string}}, as a file would
    give them (used by tests and tools that write their own config)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict(values)
    return _build([("<dict>", parser)], None)


def template():
    """The shipped config.ini: every option commented out at its default,
    its help line above it."""
    lines = [
        "# imgworker configuration.",
        "#",
        "# Every option is shown commented out at its default. Uncomment and edit",
        "# to change one, then check the file and restart the services:",
        "#   imgworker check-config && systemctl restart imgworker.target",
    ]
    for section, options in SCHEMA.items():
        lines += ["", f"[{section}]"]
        for option, spec in options.items():
            lines += ["", *textwrap.wrap(spec.help, 76, initial_indent="# ",
                                         subsequent_indent="# ")]
            lines.append(f"#{option} = {spec.default}".rstrip())
    lines += [
        "",
        "# One line per rendition a job makes: NAME = WIDTHxHEIGHT MODE FORMAT QUALITY",
        "#   MODE: fit (inside the box, never enlarged) | fill (cover the box, centre crop)",
        f"#   FORMAT: {' | '.join(RENDITION_FORMATS)}      QUALITY: 1-100 (ignored for "
        + ", ".join(spec.name for spec in formats.FORMATS if spec.output and not spec.lossy)
        + ")",
        "# Uncommenting any line here replaces the whole default set below.",
        "[renditions]",
    ]
    lines += [f"#{name} = {value}" for name, value in DEFAULT_RENDITIONS.items()]
    return "\n".join(lines) + "\n"
