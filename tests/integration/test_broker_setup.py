"""`imgworker setup-broker` against the real local RabbitMQ: what it creates,
that a rerun changes nothing, that it repairs only what it wrote, and that
the password never appears on rabbitmqctl's command line.

Needs rabbitmqctl for the broker the tests use (root, on CI or a machine
with RabbitMQ installed).
"""

import configparser
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid

import pika
import pika.exceptions
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rabbitmqctl(*args, stdin=None):
    return subprocess.run(["rabbitmqctl", "-s", *args], input=stdin, check=True,
                          capture_output=True, text=True, timeout=120).stdout.splitlines()


@pytest.fixture
def local_broker(amqp_url):
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to check what setup-broker created")
    name = f"iwtest-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=120)


def setup_broker(config_path, name, *extra):
    return subprocess.run([sys.executable, "-m", "imgworker", "--config", str(config_path),
                           "setup-broker", "--vhost", name, "--user", name,
                           "--advertise", "broker.example", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def configparser_value(path, option):
    """[broker] option in the file at path, or None."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser["broker"].get(option)


def url_in(path):
    return configparser_value(path, "url")


def connects(url):
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def test_setup_broker_creates_a_vhost_and_user_and_writes_a_private_broker_ini(tmp_path,
                                                                               local_broker):
    # Given a host with RabbitMQ and a config without any broker URL
    config_path = tmp_path / "config.ini"
    config_path.write_text("[storage]\nroot = /tmp/unused\n")
    broker_ini = tmp_path / "config.d" / "broker.ini"

    # When setup-broker runs
    result = setup_broker(config_path, local_broker)

    # Then the vhost and user exist, broker.ini holds a URL that works and
    # only its owner and group may read it, and the worker-host URL is printed
    assert result.returncode == 0, result.stderr
    assert local_broker in rabbitmqctl("list_vhosts", "name")
    assert local_broker in [line.split("\t")[0] for line in rabbitmqctl("list_users")]
    url = url_in(broker_ini)
    assert url.startswith(f"amqp://{local_broker}:") and url.endswith(f"@127.0.0.1:5672/{local_broker}")
    assert "guest" not in url
    assert connects(url)
    assert stat.S_IMODE(os.stat(broker_ini).st_mode) == 0o640
    # a new install's queues are quorum queues
    assert configparser_value(broker_ini, "queue_type") == "quorum"
    password = url.split(":")[2].split("@")[0]
    assert f"url = amqp://{local_broker}:{password}@broker.example:5672/{local_broker}\n" \
        "queue_type = quorum\n" in result.stdout


def test_a_rerun_leaves_a_working_broker_ini_alone(tmp_path, local_broker):
    config_path = tmp_path / "config.ini"
    config_path.write_text("")
    assert setup_broker(config_path, local_broker).returncode == 0
    broker_ini = tmp_path / "config.d" / "broker.ini"
    before = (broker_ini.read_bytes(), os.stat(broker_ini).st_mtime_ns)

    result = setup_broker(config_path, local_broker, "--quiet")

    assert result.returncode == 0, result.stderr
    assert (broker_ini.read_bytes(), os.stat(broker_ini).st_mtime_ns) == before
    assert "nothing to change" in result.stderr
    assert result.stdout == ""       # --quiet: the password is not printed


def test_a_broker_ini_it_wrote_gets_a_new_password_when_the_broker_forgot_the_old_one(
        tmp_path, local_broker):
    # Given a broker.ini setup-broker wrote, and a broker whose user lost that password
    config_path = tmp_path / "config.ini"
    config_path.write_text("")
    assert setup_broker(config_path, local_broker).returncode == 0
    broker_ini = tmp_path / "config.d" / "broker.ini"
    old = url_in(broker_ini)
    rabbitmqctl("change_password", local_broker, stdin="reset-by-someone\n")
    assert not connects(old)

    # When setup-broker runs again
    result = setup_broker(config_path, local_broker)

    # Then the file has a new URL that works
    assert result.returncode == 0, result.stderr
    assert url_in(broker_ini) != old and connects(url_in(broker_ini))
    assert configparser_value(broker_ini, "queue_type") == "quorum"


def test_a_rewrite_keeps_the_queue_type_an_older_broker_ini_had_none_of(tmp_path, local_broker):
    # Given a broker.ini from before queue_type existed (its queues are
    # classic), whose password the broker no longer takes
    config_path = tmp_path / "config.ini"
    config_path.write_text("")
    assert setup_broker(config_path, local_broker).returncode == 0
    broker_ini = tmp_path / "config.d" / "broker.ini"
    broker_ini.write_text("\n".join(line for line in broker_ini.read_text().splitlines()
                                    if "queue_type" not in line) + "\n")
    rabbitmqctl("change_password", local_broker, stdin="reset-by-someone\n")

    assert setup_broker(config_path, local_broker).returncode == 0

    # Then it still declares classic queues, as the ones it has
    assert connects(url_in(broker_ini))
    assert configparser_value(broker_ini, "queue_type") is None


def test_a_url_someone_else_wrote_is_never_rewritten(tmp_path, local_broker):
    # Given an operator's broker.ini with credentials the broker refuses
    config_path = tmp_path / "config.ini"
    config_path.write_text("")
    (tmp_path / "config.d").mkdir()
    broker_ini = tmp_path / "config.d" / "broker.ini"
    text = "[broker]\nurl = amqp://nobody:wrong@127.0.0.1:5672/%2F\n"
    broker_ini.write_text(text)

    result = setup_broker(config_path, local_broker)

    # Then it exits 78 saying why, and the file is untouched
    assert result.returncode == 78
    assert "refuses the credentials" in result.stderr and "left alone" in result.stderr
    assert broker_ini.read_text() == text
    assert local_broker not in rabbitmqctl("list_vhosts", "name")


def test_the_password_never_shows_on_a_command_line(tmp_path, local_broker):
    # Given a watcher reading every process's command line while setup runs
    config_path = tmp_path / "config.ini"
    config_path.write_text("")
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        seen.add(handle.read().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
            time.sleep(0.01)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = setup_broker(config_path, local_broker)
    finally:
        done.set()
        watcher.join()

    assert result.returncode == 0, result.stderr
    password = url_in(tmp_path / "config.d" / "broker.ini").split(":")[2].split("@")[0]
    assert any("add_user" in line for line in seen), "the watcher saw no rabbitmqctl add_user"
    assert not [line for line in seen if password in line]
