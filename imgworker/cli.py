"""The ``imgworker`` command: one entry point for every role."""

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request

from . import __version__, config as configuration, log
from .job import State
from .notify import Notifier

logger = logging.getLogger("imgworker")

#: sysexits.h EX_CONFIG: the units set RestartPreventExitStatus=78, so a
#: broken config.ini stops the restart loop instead of feeding it.
EXIT_CONFIG = 78

#: The states `submit --wait` stops at, as the API spells them.
_FINISHED = {state.value for state in State if state.finished}


def _load_config(args):
    try:
        return configuration.load(args.config)
    except configuration.ConfigError as error:
        print(f"imgworker: config error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _load_broker_config(args):
    """The config of a role that talks to the broker: without a [broker] url
    it exits 78 (the units do not restart it) with the two ways to fix it."""
    config = _load_config(args)
    if not config.broker.url:
        where = config.path or configuration.DEFAULT_PATH
        print(f"imgworker: no broker configured: [broker] url is not set in {where} or "
              f"{os.path.join(os.path.dirname(where), 'config.d')}/*.ini. With RabbitMQ on this "
              "host, run 'imgworker setup-broker'; on a worker-only host, write [broker] url = "
              "amqp://USER:PASSWORD@BROKER-HOST:5672/VHOST to config.d/broker.ini.",
              file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return config


def _prepare_storage(config, marker=False):
    """Create (or fix the modes of) the storage tree (and, for the API, its
    marker); a root this process cannot write exits 78 -- under systemd that
    is a root outside the units' ReadWritePaths=, which a restart will not
    change."""
    from .storage import Storage
    try:
        Storage(config.storage.root).prepare(marker)
    except OSError as error:
        print(f"imgworker: cannot use [storage] root = {config.storage.root}: {error.strerror}. "
              "A root other than /var/lib/imgworker must also be in the units' ReadWritePaths= "
              "(systemctl edit imgworker@.service imgworker-api.service imgworker-sweep.service) "
              "and the nginx site's alias.", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _as_storage_owner(config):
    """Run as the user who owns the storage root (imgworker) from here on,
    when started as root: what an operator's command writes there (a
    tombstone, a record) must stay readable by the services. The config,
    with its secrets, is read before."""
    try:
        owner = os.stat(config.storage.root)
    except FileNotFoundError:
        return
    if os.geteuid() == 0 and owner.st_uid != 0:
        os.setgroups([])
        os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)


def _prepare_process(config, allocation=None):
    """What a long-running role needs whoever started it: its metrics in
    the host's metrics directory, and its role's malloc thresholds
    (``allocation``). A directory this process cannot write exits 78."""
    from . import allocator, metrics
    if allocation:
        allocator.tune(allocation)
    try:
        metrics.setup(config)
    except OSError as error:
        print(f"imgworker: cannot use [storage] metrics_dir = {config.storage.metrics_dir}: "
              f"{error.strerror}. It must be a directory this host's imgworker processes can "
              "write (under systemd, the units' RuntimeDirectory= makes the default one).",
              file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_api(args):
    from . import server
    config = _load_broker_config(args)
    _prepare_storage(config, marker=True)
    _prepare_process(config, allocation="api")
    log.setup()
    if not config.auth.required:
        # At every start, so an install upgraded without keys is not open
        # unnoticed (debian/NEWS says how to close it).
        logger.warning("Uploads are accepted without credentials: [auth] required = false "
                       "(in %s). Add keys with 'imgworker keys add', then set it to true.",
                       config.origin("auth", "required"))
    server.run(config, Notifier())
    return 0


def cmd_worker(args):
    from .worker import Worker
    config = _load_broker_config(args)
    # The renderer child sets the same thresholds for itself (renderer.py).
    _prepare_process(config, allocation="render")
    log.setup(instance=args.instance)
    worker = Worker(config, args.instance, Notifier())
    # Not before the API's storage is in sight: on a worker-only host the
    # root may be a shared filesystem not mounted yet, and the tree must not
    # be made on the local disk beneath it.
    if not worker.wait_for_storage():
        return 0
    _prepare_storage(config)
    return worker.run()


def cmd_sweep(args):
    from . import broker
    from .ingest import recover
    from .auth import forget_spent_grants
    config = _load_broker_config(args)
    _as_storage_owner(config)
    _prepare_process(config)            # erasures it finishes are counted
    log.setup()
    forgotten = forget_spent_grants(config.storage.root)     # needs no broker
    from .storage import Storage
    storage = Storage(config.storage.root)
    storage.measure()                                        # for status and /metrics
    try:
        requeued, unmarked, dropped = recover(config, args.older_than)
    except broker.BrokerUnavailable as error:
        logger.error("Sweep stopped: %s. The next run tries again.", error)
        return 1
    from .erasure import Eraser
    age = config.api.requeue_after if args.older_than is None else args.older_than
    try:
        with Eraser(config) as eraser:
            finished = eraser.finish_unfinished(age)
    except broker.BrokerUnavailable as error:
        logger.error("Sweep stopped: erasures cut short cannot be announced: %s. The next "
                     "run tries again.", error)
        return 1
    from .webhook import forget_erased
    try:
        events = forget_erased(config, storage)
    except broker.BrokerUnavailable as error:
        logger.error("Sweep stopped: the webhook dead letters of erased jobs cannot be "
                     "removed: %s. The next run tries again.", error)
        return 1
    logger.info("Sweep done: %d jobs queued again, %d unmarked, %d uploads dropped, "
                "%d expired grants forgotten, %d erasures finished, %d webhook dead letters "
                "of erased jobs removed.", requeued, unmarked, dropped, forgotten, finished,
                events)
    return 0


def cmd_gc(args):
    from . import broker
    from .retention import collect
    config = _load_broker_config(args)
    _as_storage_owner(config)
    _prepare_process(config)
    log.setup()
    try:
        collected = collect(config, now=args.now)
    except broker.BrokerUnavailable as error:
        logger.error("gc stopped: jobs were erased but job.deleted could not be sent: %s. "
                     "imgworker sweep finishes them.", error)
        return 1
    logger.info("gc done: %d originals removed, %d jobs erased (%d index entries read).",
                collected.originals, collected.erased, collected.read)
    return 0


def cmd_erase(args):
    from . import broker
    from .erasure import Eraser, Result
    from .storage import LockTimeout
    if bool(args.ids) == (args.owner is not None):
        print("imgworker erase: give job ids, or --owner OWNER", file=sys.stderr)
        return 2
    config = _load_broker_config(args)
    _as_storage_owner(config)
    _prepare_process(config)
    log.setup()
    try:
        with Eraser(config) as eraser:
            if args.owner is not None:
                print(json.dumps({"owner": args.owner, "erased": eraser.erase_owner(args.owner)}))
                return 0
            results = eraser.erase(args.ids)
    except (broker.BrokerUnavailable, LockTimeout) as error:
        print(f"imgworker: the erasure has begun but is not finished: {error}. Run the same "
              "command again (or let imgworker sweep finish it).", file=sys.stderr)
        return 1
    print(json.dumps({result.value: [job_id for job_id, each in results.items() if each is result]
                      for result in Result}))
    return 1 if Result.UNKNOWN in results.values() else 0


def cmd_setup_broker(args):
    from .broker_setup import SetupError, setup_broker
    _load_config(args)          # a broken config.ini is reported as such first
    log.setup()
    path = args.config or os.environ.get("IMGWORKER_CONFIG") or configuration.DEFAULT_PATH
    try:
        url = setup_broker(path, vhost=args.vhost, user=args.user, advertise=args.advertise)
    except SetupError as error:
        logger.error("Broker set-up: %s", error)
        return error.exit_code
    if not args.quiet:
        # the queue type too: a host declaring the other type is refused by RabbitMQ
        print("A worker-only host needs this in /etc/imgworker/config.d/broker.ini:\n"
              f"[broker]\nurl = {url}\n"
              f"queue_type = {configuration.load(path).broker.queue_type}")
    return 0


def cmd_migrate_queues(args):
    from . import broker
    from .queue_migration import MigrationRefused, migrate
    config = _load_broker_config(args)
    log.setup()
    queue_type = args.to or config.broker.queue_type
    try:
        moved = migrate(config, queue_type)
    except (MigrationRefused, broker.BrokerUnavailable) as error:
        logger.error("Queue migration stopped: %s. Nothing was lost; run it again.", error)
        return 1
    for name, count in moved.items():
        print(f"{name}: {queue_type}, {count} messages moved")
    return 0


def cmd_dlq(args):
    from . import broker, dead_letters
    config = _load_broker_config(args)
    _as_storage_owner(config)           # replay writes records
    log.setup()
    try:
        if args.action == "list":
            letters = dead_letters.list_dead(config)
            if args.json:
                print(json.dumps([letter.as_dict() for letter in letters], indent=1))
            for letter in ([] if args.json else letters):
                shown = letter.as_dict()
                print(f"{shown['id'] or '-':32}  {shown['since'] or '-':20}  "
                      f"{shown['attempts'] if shown['attempts'] is not None else '-':>3}  "
                      f"{shown['reason']}")
            if not args.json:
                print(f"{len(letters)} in {config.broker.dead_letter_queue}", file=sys.stderr)
        elif args.action == "replay":
            if not args.all and not args.ids:
                print("imgworker dlq replay: name job ids, or --all", file=sys.stderr)
                return 2
            replayed, missing = dead_letters.replay(config, None if args.all else args.ids)
            print(f"{len(replayed)} jobs queued again" + "".join(f"\n  {i}" for i in replayed))
            for job_id in missing:
                print(f"imgworker: {job_id} is not in {config.broker.dead_letter_queue}",
                      file=sys.stderr)
            return 1 if missing else 0
        else:
            removed = dead_letters.purge(config, args.older_than)
            print(f"{removed} dead letters removed")
    except broker.BrokerUnavailable as error:
        logger.error("dlq %s stopped: %s. Nothing was lost; run it again.", args.action, error)
        return 1
    return 0


def cmd_webhook(args):
    config = _load_config(args)
    if not config.webhook.url or not config.webhook.secret:
        if args.configured:
            return 1            # ExecCondition=: the unit is skipped, not failed
        print("imgworker: webhooks are off: set [webhook] url and secret in "
              f"{config.path or configuration.DEFAULT_PATH}.", file=sys.stderr)
        return EXIT_CONFIG
    if args.configured:
        return 0
    from .webhook import WebhookSender
    config = _load_broker_config(args)
    _prepare_process(config)
    log.setup()
    return WebhookSender(config, Notifier()).run()


def cmd_status(args):
    from . import status
    config = _load_broker_config(args)
    found = status.collect(config, args.minutes)
    if args.json:
        print(json.dumps(found, indent=1))
    else:
        print("\n".join(status.render(found)))
    return 1 if found["queues"] is None else 0


def cmd_check_config(args):
    if args.template:
        sys.stdout.write(configuration.template())
        return 0
    config = _load_broker_config(args)
    source = config.path or "built-in defaults (no config file found)"
    # The unit files and the nginx site name the default root and address;
    # they cannot read config.ini, so moving either is two edits.
    defaults = configuration.from_dict({"broker": {"url": config.broker.url}})
    if config.storage.root != defaults.storage.root:
        print(f"note: [storage] root is {config.storage.root}: add it to ReadWritePaths= of the "
              "units (systemctl edit imgworker@.service imgworker-api.service "
              "imgworker-sweep.service) and set the nginx site's alias to its renditions/.",
              file=sys.stderr)
    if config.api.listen != defaults.api.listen:
        print(f"note: [api] listen is {config.api.listen}: set the same address in the nginx "
              "site's upstream (server ...).", file=sys.stderr)
    if config.storage.metrics_dir != defaults.storage.metrics_dir:
        print(f"note: [storage] metrics_dir is {config.storage.metrics_dir}: outside "
              "/run/imgworker it must be in ReadWritePaths= of the units (systemctl edit "
              "imgworker@.service imgworker-api.service imgworker-webhook.service), and it "
              "must be on this host's own disk, never the shared storage.", file=sys.stderr)
    _warn_about_units(config)
    print(f"{source}: OK; metrics: {config.storage.metrics_dir}; renditions: " +
          ", ".join(f"{r.name} {r.width}x{r.height} {r.mode} {r.format}"
                    for r in config.renditions))
    return 0


def _warn_about_units(config):
    """A warning line per unit limit the config has outgrown (units.PAIRS):
    the config is still valid, so check-config still exits 0."""
    from . import units
    for violation in units.violations(config):
        print("warning: " + units.describe(violation, config), file=sys.stderr)


def cmd_keys(args):
    from .auth import KeyFile
    config = _load_config(args)
    keys = KeyFile(config.auth.keys_file)
    try:
        if args.action == "add":
            scopes = [scope.strip() for scope in args.scope.split(",") if scope.strip()]
            if "grant" in scopes:       # the key is for asking grants: have them signed
                _grant_secrets(config).rotate(if_missing=True)
            print(keys.add(args.name, scopes))
        elif args.action == "revoke":
            keys.revoke(args.name)
            print(f"imgworker: revoked {args.name}; every running API refuses it within a "
                  "second.", file=sys.stderr)
        elif args.json:
            print(json.dumps([{"name": key.name, "scopes": list(key.scopes),
                               "created": key.created} for key in keys.list()], indent=2))
        else:
            for key in keys.list():
                print(f"{key.name}\t{','.join(key.scopes)}\t{key.created}")
    except (ValueError, LookupError) as error:
        print(f"imgworker: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"imgworker: cannot use {config.auth.keys_file}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def _grant_secrets(config):
    from .auth import GrantSecrets
    return GrantSecrets(config.auth.grant_secrets_file, config.auth.max_grant_ttl)


def cmd_grant(args):
    from .auth import Gatekeeper
    config = _load_config(args)
    try:
        print(json.dumps(Gatekeeper(config).issue(args.owner, args.max_bytes, args.ttl)))
    except (ValueError, LookupError, OSError) as error:  # a bad owner; no secret; a file
        print(f"imgworker: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_grant_secret(args):
    config = _load_config(args)
    try:
        made = _grant_secrets(config).rotate(if_missing=args.if_missing)
    except (OSError, ValueError) as error:
        print(f"imgworker: cannot use {config.auth.grant_secrets_file}: {error}", file=sys.stderr)
        return 1
    if made and not args.if_missing:
        print("imgworker: new grants are signed with a new secret; grants signed before stay "
              f"good until they expire (at most {config.auth.max_grant_ttl:g} s).",
              file=sys.stderr)
    return 0


def _request(url, data=None, content_type=None, key=None):
    request = urllib.request.Request(url, data=data)
    if content_type:
        request.add_header("Content-Type", content_type)
    if key:
        request.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.load(error)
        except ValueError:
            return error.code, {"error": error.reason}


def cmd_submit(args):
    base = args.url or f"http://{_load_config(args).api.listen}"
    with open(args.file, "rb") as handle:
        data = handle.read()
    try:
        status, body = _request(base + "/upload", data, "application/octet-stream", args.key)
        print(json.dumps({"http_status": status, **body}))
        if status != 202 or not args.wait:
            return 0 if status == 202 else 1
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            status, job = _request(base + body["status_url"])
            if job.get("state") in _FINISHED:
                print(json.dumps(job, indent=2))
                return 0 if job["state"] == State.DONE else 1
            time.sleep(0.2)
    except urllib.error.URLError as error:
        print(f"imgworker: cannot reach the API at {base}: {error.reason}", file=sys.stderr)
        return 1
    print(f"imgworker: job {body['id']} not finished after {args.timeout} s", file=sys.stderr)
    return 1


def _duration(text):
    from .dead_letters import parse_duration
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="imgworker",
        description="Self-hosted event-driven image renditions: an upload API, "
                    "RabbitMQ, and workers.")
    parser.add_argument("--version", action="version", version=f"imgworker {__version__}")
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: $IMGWORKER_CONFIG or "
                             f"{configuration.DEFAULT_PATH})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = commands.add_parser("api", help="serve the upload API (under gunicorn)",
                              description="Serve the HTTP API on [api] listen. Waits for the "
                                          "broker first and tells systemd READY=1 only then.")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="consume jobs and write renditions",
                                 description="Consume jobs from [broker] queue and write their "
                                             "renditions below [storage] root. SIGTERM finishes "
                                             "the job in hand, then exits; a second one exits "
                                             "at once.")
    worker.add_argument("--instance", default=os.environ.get("IMGWORKER_INSTANCE", "1"),
                        help="this worker's name in logs and the journal field "
                             "IMGWORKER_INSTANCE (the unit passes %%i)")
    worker.set_defaults(func=cmd_worker)

    check = commands.add_parser("check-config", help="validate the config file",
                                description="Validate the config file; exit 0 if it is usable, "
                                            f"{EXIT_CONFIG} with the file, section, option and "
                                            "value otherwise.")
    check.add_argument("--template", action="store_true",
                       help="print the commented default config.ini instead")
    check.set_defaults(func=cmd_check_config)

    setup = commands.add_parser(
        "setup-broker", help="create imgworker's vhost and user on the local RabbitMQ",
        description="Create a vhost and a user with a generated password on the local "
                    "RabbitMQ and write [broker] url to config.d/broker.ini (0640 "
                    "root:imgworker). Idempotent: a URL that works is left alone; one this "
                    "command wrote whose credentials stopped working gets a new password. "
                    "Prints the URL a worker-only host needs. Exit 69 when there is no "
                    "running RabbitMQ here, 78 when a URL someone else wrote does not work.")
    setup.add_argument("--vhost", default="imgworker", help="vhost (default imgworker)")
    setup.add_argument("--user", default="imgworker", help="user (default imgworker)")
    setup.add_argument("--advertise", metavar="HOST",
                       help="this host's name in the printed URL (default: its FQDN)")
    setup.add_argument("--quiet", action="store_true",
                       help="do not print the URL (it carries the password)")
    setup.set_defaults(func=cmd_setup_broker)

    migrate = commands.add_parser(
        "migrate-queues", help="move both queues to another type, keeping every message",
        description="Make the job queue and the dead-letter queue the given type (default: "
                    "[broker] queue_type), moving their messages through a temporary queue "
                    "with publisher confirms. With the API and the workers stopped; "
                    "safe to rerun if cut short.")
    migrate.add_argument("--to", choices=("classic", "quorum"),
                         help="the queue type (default: [broker] queue_type)")
    migrate.set_defaults(func=cmd_migrate_queues)

    webhook = commands.add_parser(
        "webhook", help="POST job events, signed, to [webhook] url",
        description="Consume imgworker.webhooks (bound to the imgworker.events exchange) and "
                    "POST each event to [webhook] url with an Imgworker-Signature header; "
                    "retry connection errors, timeouts, 408, 429 and 5xx with backoff up to "
                    "[webhook] max_attempts, then dead-letter to imgworker.webhooks.dead. "
                    f"Exit {EXIT_CONFIG} if no url and secret are set.")
    webhook.add_argument("--configured", action="store_true",
                         help="only say whether webhooks are on: exit 0 if [webhook] url and "
                              "secret are set, else 1 (the unit's ExecCondition=)")
    webhook.set_defaults(func=cmd_webhook)

    state = commands.add_parser(
        "status", help="queues, this host's units, recent jobs",
        description="The job queue and the dead-letter queue (messages, consumers), the "
                    "imgworker units on this host with their systemd status line, and how "
                    "many jobs were done or failed in the last minutes. Exit 1 if the broker "
                    "cannot be reached.")
    state.add_argument("--json", action="store_true", help="as JSON")
    state.add_argument("--minutes", type=float, default=5.0,
                       help="the window for recent jobs (default 5)")
    state.set_defaults(func=cmd_status)

    dlq = commands.add_parser(
        "dlq", help="look at, replay or purge the dead-letter queue",
        description="The jobs that failed for good, in [broker] dead_letter_queue: list "
                    "them, queue them again (after fixing why they failed), or remove them. "
                    "Nothing is lost if it is cut short: run it again.")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="id, reason, attempts and since when of each")
    listing.add_argument("--json", action="store_true", help="as a JSON list")
    replaying = actions.add_parser(
        "replay", help="queue jobs again: attempts start over; the dead letter is removed "
                       "only once the broker confirmed the new message")
    replaying.add_argument("ids", nargs="*", metavar="ID", help="job ids")
    replaying.add_argument("--all", action="store_true", help="every job in the queue")
    purging = actions.add_parser("purge", help="remove dead letters (the records stay)")
    purging.add_argument("--older-than", type=_duration, metavar="DURATION",
                         help="only those dead-lettered longer ago than this (90s, 15m, 12h, "
                              "7d); default all")
    dlq.set_defaults(func=cmd_dlq)

    sweeper = commands.add_parser("sweep", help="queue uploads a crashed API left behind",
                                  description="Queue again the uploads whose API process died "
                                              "before the broker confirmed them, drop "
                                              "uploads that were never accepted, finish "
                                              "erasures cut short, remove the webhook dead "
                                              "letters of erased jobs and forget expired "
                                              "grants. "
                                              "Run by imgworker-sweep.timer.")
    sweeper.add_argument("--older-than", type=float, metavar="SECONDS",
                         help="only what is older than this (default: [api] requeue_after)")
    sweeper.set_defaults(func=cmd_sweep)

    submit = commands.add_parser("submit", help="upload an image through the API",
                                 description="Upload FILE to the API and print the job. With "
                                             "--wait, poll until it is done or failed.")
    submit.add_argument("file", metavar="FILE")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait with --wait (default 60)")
    submit.add_argument("--url", help="API base URL (default: http://[api] listen)")
    submit.add_argument("--key", default=os.environ.get("IMGWORKER_KEY"),
                        help="an API key of scope upload, or a grant (default: $IMGWORKER_KEY)")
    submit.set_defaults(func=cmd_submit)

    eraser = commands.add_parser(
        "erase", help="erase jobs: their original, record and renditions, for good",
        description="Erase the given jobs, or every job of an owner: remove their files "
                    "durably, make sure no worker writes them again, and send job.deleted "
                    "for each. Prints {erased, gone, unknown} as JSON (or {owner, erased} "
                    "with --owner); exit 1 if an id is unknown or the erasure could not "
                    "be finished (run it again, or imgworker sweep finishes it).")
    eraser.add_argument("ids", nargs="*", metavar="ID", help="job ids")
    eraser.add_argument("--owner", help="every job uploaded for this owner")
    eraser.set_defaults(func=cmd_erase)

    collector = commands.add_parser(
        "gc", help="apply [retention]: remove originals and erase jobs past their periods",
        description="Remove the originals of jobs that ended more than [retention] "
                    "originals ago, and erase done jobs past [retention] renditions and "
                    "failed ones past [retention] failed (job.deleted, reason retention). "
                    "Reads only the jobs that ended since its last run's cutoff. Run by "
                    "imgworker-gc.timer.")
    collector.add_argument("--now", type=float, metavar="UNIX_TIME",
                           help="act as if it were this Unix time (for tests; what is "
                                "past its periods then is removed for real)")
    collector.set_defaults(func=cmd_gc)

    keys = commands.add_parser(
        "keys", help="add, list or revoke API keys",
        description="API keys let the app's servers upload (scope upload), ask for upload "
                    "grants for browsers (grant) and erase (delete). Only a SHA-256 of each "
                    "key is kept, in [auth] keys_file; running APIs see a change within a "
                    "second.")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    adding = key_actions.add_parser("add", help="make a key and print it (the only time it "
                                                "is shown)")
    adding.add_argument("name", metavar="NAME", help="what the key is for, e.g. the app's name")
    adding.add_argument("--scope", required=True, metavar="SCOPES",
                        help="comma-separated: upload, grant, delete")
    key_listing = key_actions.add_parser("list", help="name, scopes and creation time of each "
                                                      "key (never the key)")
    key_listing.add_argument("--json", action="store_true", help="as a JSON list")
    revoking = key_actions.add_parser("revoke", help="refuse a key from now on")
    revoking.add_argument("name", metavar="NAME")
    keys.set_defaults(func=cmd_keys, json=False)

    grant = commands.add_parser(
        "grant", help="print an upload grant, as POST /grants gives one",
        description="Sign a grant good for one upload, for OWNER (an opaque id of the "
                    "app's user), and print {grant, expires_at, upload_url} as JSON.")
    grant.add_argument("--owner", required=True)
    grant.add_argument("--ttl", type=float, metavar="SECONDS",
                       help="lifetime (default and most: [auth] max_grant_ttl)")
    grant.add_argument("--max-bytes", type=int, metavar="N",
                       help="largest upload (default and most: [api] max_upload_bytes)")
    grant.set_defaults(func=cmd_grant)

    grant_secret = commands.add_parser(
        "grant-secret", help="rotate the secret upload grants are signed with")
    grant_secret_actions = grant_secret.add_subparsers(dest="action", required=True,
                                                       metavar="ACTION")
    rotating = grant_secret_actions.add_parser(
        "rotate", help="sign new grants with a new secret; the old one verifies the grants it "
                       "signed until they expire")
    rotating.add_argument("--if-missing", action="store_true",
                          help="only make the first secret, if there is none (the package's "
                               "postinst)")
    grant_secret.set_defaults(func=cmd_grant_secret)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
