"""A broker connection lost in the middle of a command or a scrape, on the real
RabbitMQ: a loopback proxy in front of it cuts one client's connection (named
in its handshake) once it is open, at the AMQP method chosen. Whatever uses
broker.py sees BrokerUnavailable, never pika's errors: GET /metrics answers
imgworker_broker_up 0, and the commands say why in one line."""

import os
import socket
import struct
import subprocess
import sys
import threading
import urllib.parse

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.pipeline import REPO

#: (class id, method id) of the AMQP methods a test cuts a connection at
QUEUE_DECLARE, BASIC_GET = (50, 10), (60, 70)
_CONNECTION_START_OK = (10, 11)


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to the broker. A connection whose client
    properties contain ``client`` (e.g. b"imgworker status") is reset when the
    client sends ``method``, before the broker sees it: the handshake and the
    channel opened, the connection is lost mid-way. Other connections pass."""

    def __init__(self, amqp_url, client, method):
        target = urllib.parse.urlsplit(amqp_url)
        self.broker = (target.hostname, target.port or 5672)
        self.client, self.method = client, method
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        self.url = urllib.parse.urlunsplit(target._replace(netloc=(
            f"{target.username}:{target.password}@127.0.0.1:{port}")))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return                          # closed
            server = socket.create_connection(self.broker)
            threading.Thread(target=self._to_broker, args=(client, server), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client), daemon=True).start()

    def _to_client(self, server, client):
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        _close(client)

    def _to_broker(self, client, server):
        """Forward whole frames (after the 8-byte protocol header), looking
        at each method frame's class and method ids."""
        named = False
        try:
            header = _read(client, 8)
            server.sendall(header)
            while True:
                frame_type, _channel, size = struct.unpack("!BHI", _read(client, 7))
                payload = _read(client, size + 1)          # the payload and 0xCE
                if frame_type == 1:
                    method = struct.unpack("!HH", payload[:4])
                    named = named or (method == _CONNECTION_START_OK
                                      and self.client in payload)
                    if named and method == self.method:
                        self.cuts += 1
                        _reset(client)
                        _reset(server)
                        return
                server.sendall(struct.pack("!BHI", frame_type, _channel, size) + payload)
        except (OSError, EOFError):
            pass
        _close(server)

    def close(self):
        self.listener.close()


def _read(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _reset(sock):
    """Close with a TCP RST, as a dropped connection or a killed peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def cutting_proxy(amqp_url):
    made = []

    def make(client, method):
        made.append(CuttingProxy(amqp_url, client, method))
        return made[-1]
    yield make
    for proxy in made:
        proxy.close()


def run(pipeline, *args):
    """An imgworker command as an operator runs it, its config in IMGWORKER_CONFIG."""
    return subprocess.run([sys.executable, "-m", "imgworker", *args], cwd=REPO,
                          env={**os.environ, "IMGWORKER_CONFIG": pipeline.config_path},
                          capture_output=True, text=True, timeout=60)


def test_a_connection_lost_mid_scrape_answers_200_with_broker_up_0(make_pipeline, cutting_proxy):
    # Given an API whose broker is behind a proxy that cuts each scrape's
    # connection (opened, its channel too) at its first queue declare
    proxy = cutting_proxy(b"imgworker status", QUEUE_DECLARE)
    pipeline = make_pipeline(broker={"url": proxy.url})
    pipeline.start_api()
    # When Prometheus scrapes /metrics
    response = requests.get(pipeline.base_url + "/metrics", timeout=30)
    # Then it gets the metrics, saying the broker did not answer
    assert proxy.cuts == 1
    assert response.status_code == 200, response.text
    samples = {sample.name: sample.value for family in text_string_to_metric_families(
        response.text) for sample in family.samples}
    assert samples["imgworker_broker_up"] == 0
    assert "imgworker_queue_messages" not in samples
    assert "Traceback" not in pipeline.services[0].log()


def test_status_with_a_connection_lost_mid_way_says_so_and_exits_1(make_pipeline, cutting_proxy):
    proxy = cutting_proxy(b"imgworker status", QUEUE_DECLARE)
    pipeline = make_pipeline(broker={"url": proxy.url})
    shown = run(pipeline, "status")
    assert proxy.cuts == 1
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("broker:")]
    assert line.startswith("broker: unreachable: "), shown.stdout
    assert "jobs changed in the last" in shown.stdout        # the rest is still shown


def test_dlq_list_with_a_connection_lost_while_reading_says_so_and_exits_1(make_pipeline,
                                                                          cutting_proxy):
    proxy = cutting_proxy(b"imgworker dlq", BASIC_GET)
    pipeline = make_pipeline(broker={"url": proxy.url})
    shown = run(pipeline, "dlq", "list")
    assert proxy.cuts == 1
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
    assert "dlq list stopped: " in shown.stderr and "run it again" in shown.stderr


def test_migrate_queues_with_a_connection_lost_mid_way_says_so_and_exits_1(make_pipeline,
                                                                          cutting_proxy):
    proxy = cutting_proxy(b"imgworker migrate-queues", QUEUE_DECLARE)
    pipeline = make_pipeline(broker={"url": proxy.url})
    shown = run(pipeline, "migrate-queues", "--to", "quorum")
    assert proxy.cuts == 1
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
    assert "Queue migration stopped: " in shown.stderr
