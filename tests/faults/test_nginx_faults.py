"""Scenario 11: nginx, the front door, refuses what it should by itself --
too large, too slow, the API away -- and every refusal is a prompt answer
(or, for a stalled body, a closed connection), never a hang.

nginx runs the shipped nginx/imgworker.conf (see harness.Nginx)."""

import socket
import time

import requests

from imgworker import config
from harness.ledger import Ledger

#: client_max_body_size, equal to the API's (tests/test_shipped_files.py)
LIMIT = config.from_dict({}).api.max_upload_bytes
BODY_TIMEOUT = 30                 # client_body_timeout 30s


def raw_post(port, head_extra, body=b""):
    """A socket that has sent POST /upload's head and the first body bytes."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(b"POST /upload HTTP/1.1\r\nHost: imgworker\r\n"
                       b"Content-Type: image/jpeg\r\n" + head_extra + b"\r\n" + body)
    return connection


def read_all(connection):
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def test_a_body_over_the_limit_gets_413_from_nginx_and_never_reaches_the_api(make_pipeline):
    pipeline = make_pipeline()
    pipeline.start_api()
    nginx = pipeline.start_nginx()

    # Declared too large: refused on the head alone, before any body is read
    started = time.monotonic()
    with raw_post(nginx.port, b"Content-Length: %d\r\n" % (LIMIT + 1)) as connection:
        answer = connection.recv(65536)
        answered_after = time.monotonic() - started
        answer += read_all(connection)   # closed after nginx's lingering close
    assert answered_after < 1
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Content-Type: application/json" in head
    assert body == b'{"error": "the upload is larger than 25 MiB (client_max_body_size)"}\n'

    # Sent chunked with no length: counted while read, refused past the limit
    def chunks():
        block = b"\xff" * (1 << 20)
        for _ in range(LIMIT // len(block) + 2):
            yield block
    response = requests.post(nginx.base_url + "/upload", data=chunks(), timeout=30,
                             headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413
    assert "larger than 25 MiB" in response.json()["error"]

    # Neither reached the API: nothing stored, and the access log shows
    # nginx's two 413s and nothing else
    assert pipeline.stored_originals() == [] and pipeline.stored_jobs() == []
    assert nginx.statuses(at_least=2) == [413, 413]


def test_with_the_api_down_nginx_answers_503_with_retry_after_and_still_413(make_pipeline):
    pipeline = make_pipeline()
    nginx = pipeline.start_nginx()       # no API behind it: restarted, upgraded, crashed
    photo = Ledger.for_pipeline(pipeline, "-").photo

    response = requests.post(nginx.base_url + "/upload", data=photo, timeout=10,
                             headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json() == {"error": "the imgworker API is not running; try again shortly"}
    assert requests.get(nginx.base_url + "/jobs/" + "0" * 32, timeout=10).status_code == 503

    # The size limit is nginx's own: it holds with no API at all
    with raw_post(nginx.port, b"Content-Length: %d\r\n" % (LIMIT + 1)) as connection:
        assert read_all(connection).startswith(b"HTTP/1.1 413 ")


def test_a_stalled_body_is_cut_off_after_client_body_timeout_while_others_get_through(
        make_pipeline):
    pipeline = make_pipeline()
    pipeline.start_api()
    pipeline.start_worker()
    nginx = pipeline.start_nginx()
    ledger = Ledger("11. nginx: a body stalled past client_body_timeout", nginx.base_url,
                    pipeline.root, [r.name for r in pipeline.renditions])

    # A client that declares 500 KB, sends 1 KB and then nothing
    stalled = raw_post(nginx.port, b"Content-Length: 500000\r\n", b"\xff\xd8" + b"\0" * 1022)
    started = time.monotonic()
    # Meanwhile other clients upload as usual through the same nginx
    load = ledger.run_load(count=60, per_second=4)
    answer = read_all(stalled)      # returns when nginx closes the connection
    cut_off_after = time.monotonic() - started
    stalled.close()
    load.join()

    # nginx gives up on it after client_body_timeout: it logs 408 and closes
    # the connection without a response (nginx never answers a request whose
    # body timed out), so the client sees the connection end, not a hang
    assert answer == b""
    assert BODY_TIMEOUT - 1 < cut_off_after < BODY_TIMEOUT + 5
    assert 408 in nginx.statuses(at_least=61)
    # The stalled body never reached the API: only the load's jobs exist
    assert len(pipeline.stored_originals()) == len(ledger.accepted)
    counters = ledger.check()
    counters.notes.append(f"stalled body cut off after {cut_off_after:.1f} s")
    assert counters.accepted == 60 and counters.lost == 0 and counters.corrupt == 0


def test_nginx_serves_renditions_with_their_image_type_and_nosniff(make_pipeline):
    from harness import samples
    # Given a job done through the shipped site, one of its renditions a WebP
    pipeline = make_pipeline(renditions={"large": "1600x1600 fit jpeg 85",
                                         "card": "400x400 fill webp 80"})
    pipeline.start_api()
    pipeline.start_worker()
    nginx = pipeline.start_nginx()
    response = requests.post(nginx.base_url + "/upload", data=samples.jpeg(800, 600), timeout=30)
    assert response.status_code == 202
    job = pipeline.wait_job(response.json()["id"])
    assert job["state"] == "done"
    # When a browser fetches the renditions from nginx
    for name, content_type in (("large", "image/jpeg"), ("card", "image/webp")):
        served = requests.get(nginx.base_url + job["renditions"][name]["url"], timeout=10)
        # Then each has its image type and nosniff, and is the file on disk
        assert served.status_code == 200
        assert served.headers["Content-Type"] == content_type
        assert served.headers["X-Content-Type-Options"] == "nosniff"
        assert len(served.content) == job["renditions"][name]["bytes"]
