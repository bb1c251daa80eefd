"""``imgworker setup-broker``: a vhost, a user and a password of imgworker's
own on the local RabbitMQ, written to ``config.d/broker.ini``.

It is idempotent, because three parties run it: the package's postinst (when
RabbitMQ already runs), ``imgworker-setup-broker.service`` (ordered after
``rabbitmq-server.service`` and wanted by it, so a broker configured after
imgworker -- or installed later -- still gets set up before the API and the
workers start), and an operator. Each run ends in one of three ways:

- the configured URL already works: nothing is touched (a broker.ini the
  operator wrote for a remote broker is never rewritten);
- the URL is one this command wrote and the broker refuses its credentials
  (its data was reset): the password is set again and the file rewritten;
- there is no URL: the vhost, the user and its permissions are created and
  broker.ini is written, 0640 root:imgworker.

A broker.ini written for a new install also says ``queue_type = quorum``
(NEW_INSTALL_QUEUE_TYPE); one rewritten keeps the type the old file had, or
none (the built-in ``classic``): RabbitMQ refuses to redeclare an existing
queue as another type.

The password goes to ``rabbitmqctl`` on its standard input, never on its
command line, where ``ps`` would show it.
"""

import grp
import logging
import os
import secrets
import shutil
import socket
import subprocess
import urllib.parse

import pika
import pika.exceptions

from . import broker, config as configuration, storage

logger = logging.getLogger(__name__)

#: The first line of every broker.ini this command writes: only such a file
#: is rewritten when its credentials stop working.
MARKER = "# Written by 'imgworker setup-broker'"

#: New installs get quorum queues: RabbitMQ's recommended durable queue,
#: the only replicated type in 4.x (so a host that later joins a cluster
#: needs no migration), with a delivery limit on disk as a backstop to the
#: attempt count. On one node it costs little: bench/results/cluster. The
#: built-in default stays classic, which is what older installs declared.
NEW_INSTALL_QUEUE_TYPE = "quorum"

#: What one rabbitmqctl call may take; each starts an Erlang VM, which is
#: slow on a host still booting or configuring packages.
_RABBITMQCTL_TIMEOUT = 90


class SetupError(Exception):
    """The broker cannot be set up from here; the message says what to do.
    ``exit_code`` is a sysexits.h code for the CLI."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


#: sysexits.h: nothing to set up here now (no local RabbitMQ, or it is down).
EX_UNAVAILABLE = 69
#: sysexits.h: a URL someone else configured does not work.
EX_CONFIG = 78


def broker_ini_path(config_path):
    return os.path.join(os.path.dirname(config_path), "config.d", "broker.ini")


def setup_broker(config_path, vhost="imgworker", user="imgworker", advertise=None):
    """Make [broker] url work against the local RabbitMQ; return the URL a
    worker-only host needs (advertising this host as ``advertise``)."""
    path = broker_ini_path(config_path)
    url = configuration.load(config_path).broker.url
    if url:
        problem = _connection_problem(url)
        if problem is None:
            logger.info("[broker] url works (%s); nothing to change.", _redacted(url))
            return _for_workers(url, advertise)
        if problem is not _REFUSED:
            raise SetupError(f"[broker] url = {_redacted(url)} does not work: {problem}. "
                             "Start that RabbitMQ and run this again.", EX_UNAVAILABLE)
        if _in(path, "url") != url or not _written_by_us(path):
            raise SetupError(
                f"RabbitMQ refuses the credentials in [broker] url = {_redacted(url)}. "
                "setup-broker did not write that URL, so it is left alone: fix it, or remove "
                f"it (and {path}) and run 'imgworker setup-broker' again.", EX_CONFIG)
        logger.warning("RabbitMQ refuses the credentials in %s (was its data reset?); "
                       "setting a new password.", path)
    rabbitmqctl = _Rabbitmqctl()
    password = secrets.token_urlsafe(24)
    rabbitmqctl.ensure_vhost(vhost)
    rabbitmqctl.ensure_user(user, password)
    rabbitmqctl.run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    url = f"amqp://{user}:{password}@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"
    queue_type = _in(path, "queue_type") if os.path.exists(path) else NEW_INSTALL_QUEUE_TYPE
    _write_broker_ini(path, url, queue_type)
    problem = _connection_problem(url)
    if problem is not None:
        raise SetupError(f"wrote {path}, but its URL does not work: {problem}", EX_UNAVAILABLE)
    logger.info("Created vhost %r and user %r on the local RabbitMQ; wrote %s.", vhost, user, path)
    return _for_workers(url, advertise)


#: _connection_problem's answer when the broker answers but refuses the login.
_REFUSED = "the broker refused the credentials or the vhost"


def _connection_problem(url):
    """None if a connection with url works; else _REFUSED or a reason."""
    every = []
    for one in configuration.split_urls(url):
        params = pika.URLParameters(one)
        params.connection_attempts = 1
        params.socket_timeout = params.stack_timeout = 5
        every.append(params)
    try:
        pika.BlockingConnection(every).close()
    except (pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError):
        return _REFUSED
    except pika.exceptions.AMQPError as error:
        return broker.describe(error)
    except OSError as error:
        return f"cannot reach the broker ({error})"
    return None


def _in(path, option):
    """[broker] option's value in the file at path ("" if unset; None if unreadable)."""
    try:
        return configuration.read_raw(path).get("broker", option, fallback="").strip()
    except (OSError, configuration.ConfigError):
        return None


def _written_by_us(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith(MARKER)
    except OSError:
        return False


def _write_broker_ini(path, url, queue_type):
    text = (f"{MARKER} for the local RabbitMQ.\n"
            "# Yours to edit: on a worker-only host, point it at the broker's host instead.\n"
            f"[broker]\nurl = {url}\n")
    if queue_type:
        text += ("# The type the queues were declared with; to change it, see\n"
                 "# 'imgworker migrate-queues' in imgworker(1).\n"
                 f"queue_type = {queue_type}\n")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_atomically(path, text.encode())   # created 0600: never briefly wider
    try:
        gid = grp.getgrnam("imgworker").gr_gid if os.geteuid() == 0 else -1
    except KeyError:
        gid = -1          # no system user (a checkout): the owner's file
    os.chown(path, -1, gid)
    # 0640 root:imgworker: the services (group imgworker) read it, nobody else.
    os.chmod(path, 0o640)


def _redacted(url):
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _for_workers(url, advertise):
    """The same URL with this host's name instead of a loopback address."""
    parts = urllib.parse.urlsplit(url)
    if "," in url or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return url
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{advertise or socket.getfqdn()}:{parts.port or 5672}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc))


class _Rabbitmqctl:
    """The local node, through rabbitmqctl (which needs the node's cookie:
    run as root or rabbitmq)."""

    def __init__(self):
        self._path = shutil.which("rabbitmqctl") or (
            "/usr/sbin/rabbitmqctl" if os.path.exists("/usr/sbin/rabbitmqctl") else None)
        if self._path is None:
            raise SetupError(
                "RabbitMQ is not installed on this host. On a worker-only host, write "
                "[broker] url = amqp://USER:PASSWORD@BROKER-HOST:5672/VHOST to "
                "/etc/imgworker/config.d/broker.ini (run 'imgworker setup-broker' on the "
                "broker's host to get that line).", EX_UNAVAILABLE)
        # await_startup fails at once (69) while no node is running at all.
        if self._call("await_startup", "--timeout", "60").returncode != 0:
            raise SetupError("RabbitMQ is installed but not running here; start it "
                             "(systemctl start rabbitmq-server) and run 'imgworker "
                             "setup-broker' again.", EX_UNAVAILABLE)

    def _call(self, *args, stdin=None):
        # -s (no banners, no table headers) except when a password comes on
        # stdin: RabbitMQ 4.0's rabbitmqctl then never reads it and hangs.
        flags = [] if stdin else ["-s"]
        try:
            return subprocess.run([self._path, *flags, *args], input=stdin, capture_output=True,
                                  text=True, timeout=_RABBITMQCTL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SetupError(f"rabbitmqctl {args[0]} did not answer within "
                             f"{_RABBITMQCTL_TIMEOUT} s", EX_UNAVAILABLE) from None

    def run(self, *args, stdin=None):
        result = self._call(*args, stdin=stdin)
        if result.returncode != 0:
            raise SetupError(f"rabbitmqctl {args[0]} failed: "
                             f"{(result.stderr or result.stdout).strip()}", EX_UNAVAILABLE)
        return result.stdout.splitlines()

    def ensure_vhost(self, vhost):
        if vhost not in self.run("list_vhosts", "name"):
            self.run("add_vhost", vhost)

    def ensure_user(self, user, password):
        users = [line.split("\t")[0] for line in self.run("list_users")]
        # The password on stdin: rabbitmqctl reads it there when it is not an argument.
        self.run("change_password" if user in users else "add_user", user, stdin=password + "\n")
