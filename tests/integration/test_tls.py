"""The shipped HTTPS site (nginx/sites-available/imgworker-tls.conf), as an
operator enables it: the same rules as the HTTP site over TLS, HSTS on
every answer, plain HTTP only redirected. The certificate is a self-signed
one the harness makes for 127.0.0.1, standing in for certbot's."""

import socket
import ssl

import requests

from harness import samples


def test_uploads_over_https_get_hsts_and_plain_http_is_only_redirected(make_pipeline):
    pipeline = make_pipeline(auth={"required": "true"})
    pipeline.start_api()
    pipeline.start_worker()
    nginx = pipeline.start_nginx(tls=True)
    key = pipeline.add_key("app", "upload")

    refused = requests.post(nginx.base_url + "/upload", data=samples.jpeg(64, 48),
                            verify=nginx.certificate, timeout=10)
    assert (refused.status_code, refused.json()["reason"]) == (401, "missing")
    assert refused.headers["Strict-Transport-Security"] == "max-age=63072000"

    accepted = requests.post(nginx.base_url + "/upload", data=samples.jpeg(64, 48),
                             headers={"Authorization": f"Bearer {key}"},
                             verify=nginx.certificate, timeout=10)
    assert accepted.status_code == 202, accepted.text
    job = pipeline.wait_job(accepted.json()["id"])
    thumb = requests.get(nginx.base_url + job["renditions"]["thumb"]["url"],
                         verify=nginx.certificate, timeout=10)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert thumb.headers["Strict-Transport-Security"] == "max-age=63072000"

    # TLS 1.2 at least: an old client is turned away in the handshake
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(nginx.certificate)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        with socket.create_connection(("127.0.0.1", nginx.tls_port), timeout=5) as raw, \
                old.wrap_socket(raw, server_hostname="127.0.0.1"):
            negotiated = True
    except (ssl.SSLError, ConnectionError):
        negotiated = False
    assert not negotiated

    # plain HTTP: a redirect to the same path over https, and nothing stored
    before = pipeline.stored_jobs()
    plain = requests.post(nginx.http_url + "/upload?x=1", data=samples.jpeg(64, 48),
                          headers={"Authorization": f"Bearer {key}"},
                          allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == "https://127.0.0.1/upload?x=1"
    assert "Strict-Transport-Security" not in plain.headers
    assert pipeline.stored_jobs() == before
