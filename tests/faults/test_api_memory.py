"""Legal load cannot outgrow the API's memory limit: 32 maximum-size uploads
at once -- every thread of the shipped [api] workers x threads busy with
one -- through the shipped nginx site keep the API processes' peak memory
under the MemoryMax of the shipped imgworker-api.service. Past its budget
of body bytes in flight ([api] max_body_memory) a process answers 503 with
Retry-After before reading the body, and those uploads succeed when sent
again.

Memory is each API process's peak RSS (VmHWM), reset through
/proc/PID/clear_refs before the uploads."""

import concurrent.futures
import io
import json
import os
import random
import re
import socket
import time

import requests
from PIL import Image

from imgworker import config, units
from harness.pipeline import REPO, children

DEFAULTS = config.from_dict({})
UPLOADS = DEFAULTS.api.workers * DEFAULTS.api.threads
FORM_OVERHEAD = 512


def largest_legal_jpeg():
    """A noisy JPEG (it does not compress) just under [api] max_upload_bytes
    once wrapped in a multipart form, and far under max_pixels."""
    noise = random.Random(22)
    width, height = 4096, 3300
    while True:
        image = Image.frombytes("RGB", (width, height), noise.randbytes(width * height * 3))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=100)
        if len(buffer.getvalue()) + FORM_OVERHEAD <= DEFAULTS.api.max_upload_bytes:
            assert len(buffer.getvalue()) > DEFAULTS.api.max_upload_bytes - (1 << 20)
            assert width * height <= DEFAULTS.api.max_pixels
            return buffer.getvalue()
        height -= 16


def form(data):
    return (b'--b\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--b--\r\n")


class Answer:
    """An HTTP/1.1 answer read from a socket: status, headers, JSON body."""

    def __init__(self, connection):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            assert chunk, f"the connection was closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_code = int(lines[0].split()[1])
        self.headers = {name.strip().title(): value.strip()
                        for name, _, value in (line.partition(":") for line in lines[1:])}
        while len(body) < int(self.headers["Content-Length"]):
            chunk = connection.recv(65536)
            assert chunk, "the connection was closed mid-answer"
            body += chunk
        self.body = body

    def json(self):
        return json.loads(self.body)


def send_at_once(port, body, count):
    """``count`` uploads of ``body`` whose last bytes are sent together, so
    nginx hands them all to the API at the same moment."""
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port), timeout=60)
        connection.sendall(b"POST /upload HTTP/1.1\r\nHost: imgworker\r\nConnection: close\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body[:-1])
        connections.append(connection)
    for connection in connections:
        connection.sendall(body[-1:])
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(Answer, connections))
    for connection in connections:
        connection.close()
    return answers


def shipped_memory_max():
    with open(os.path.join(REPO, "systemd", "imgworker-api.service")) as handle:
        (raw,) = re.findall(r"^MemoryMax=(.*)$", handle.read(), re.MULTILINE)
    return units.parse_bytes(raw)


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as handle:
        (kib,) = re.findall(r"^VmHWM:\s+(\d+) kB", handle.read(), re.MULTILINE)
    return int(kib) << 10


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def test_32_maximum_size_uploads_at_once_stay_under_the_api_units_memory_max(make_pipeline):
    # Given the API as shipped ([api] workers and threads at their defaults)
    # behind the shipped nginx site, and the largest legal upload
    pipeline = make_pipeline(api={"workers": str(DEFAULTS.api.workers),
                                  "threads": str(DEFAULTS.api.threads)})
    api = pipeline.start_api()
    nginx = pipeline.start_nginx()
    photo = largest_legal_jpeg()
    processes = [api.process.pid] + children(api.process.pid)
    assert len(processes) == 1 + DEFAULTS.api.workers
    # (every process has loaded its imports and made its broker connection)
    for _ in range(2 * DEFAULTS.api.workers):
        assert requests.get(nginx.base_url + "/healthz", timeout=10).status_code == 200
    for pid in processes:
        reset_peak(pid)

    # When every thread of the API gets one at once
    def upload(_):
        return requests.post(nginx.base_url + "/upload", timeout=60,
                             files={"file": ("photo.jpg", photo, "image/jpeg")})
    started = time.monotonic()
    answers = send_at_once(nginx.port, form(photo), UPLOADS)
    took = time.monotonic() - started
    peak = sum(peak_rss(pid) for pid in processes)

    # Then each is accepted, or refused with 503 and Retry-After by the API
    # itself (its JSON, not nginx's "not running") ...
    statuses = [answer.status_code for answer in answers]
    print(f"\n{UPLOADS} uploads of {len(photo)} bytes in {took:.1f} s: "
          f"{statuses.count(202)} x 202, {statuses.count(503)} x 503; the API's "
          f"processes peaked at {peak / (1 << 20):.0f} MiB in all "
          f"(MemoryMax={shipped_memory_max() / (1 << 20):.0f} MiB)")
    assert set(statuses) <= {202, 503}, statuses
    refused = [answer for answer in answers if answer.status_code == 503]
    for answer in refused:
        assert int(answer.headers["Retry-After"]) > 0
        assert "uploads in flight" in answer.json()["error"]
    # ... and the API's processes together stayed under the unit's limit
    assert peak < shipped_memory_max()
    assert all(children(api.process.pid).count(pid) for pid in processes[1:]), "a worker died"

    # And each refused one is accepted when sent again
    with concurrent.futures.ThreadPoolExecutor(max(1, len(refused))) as pool:
        retried = list(pool.map(upload, range(len(refused))))
    for _ in range(5):
        still = [answer for answer in retried if answer.status_code == 503]
        if not still:
            break
        time.sleep(1)
        retried = [answer for answer in retried if answer.status_code == 202] + \
            [upload(0) for _ in still]
    assert [answer.status_code for answer in retried] == [202] * len(refused)
    assert len(pipeline.stored_originals()) == UPLOADS
