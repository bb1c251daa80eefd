"""Upload -> 202 -> worker -> renditions, and every way an upload is refused."""

import io
import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from harness import samples
from harness.pipeline import REPO, free_port


def test_an_upload_gets_202_and_its_renditions_appear_upright_sized_and_without_exif(pipeline):
    # Given the API and one worker
    pipeline.start_api()
    pipeline.start_worker()
    # When a phone photo (stored landscape, EXIF says rotate 90, with GPS) is uploaded
    photo = samples.photo(2400, 1600)
    exif = Image.Exif()
    exif[samples.ORIENTATION] = 6
    exif.get_ifd(samples.GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0)})
    response = pipeline.upload(samples.encode(photo, "JPEG", quality=90, exif=exif.tobytes()))
    # Then it is accepted at once with where to look
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == body["status_url"] == f"/jobs/{body['id']}"
    # And the job ends done with portrait renditions of the configured sizes
    job = pipeline.wait_job(body["id"])
    assert job["state"] == "done", job
    assert job["attempts"] == 1
    assert job["original"] == {"format": "jpeg", "width": 2400, "height": 1600,
                               "bytes": job["original"]["bytes"]}
    expected = {"large": (1067, 1600), "medium": (533, 800), "thumb": (200, 200)}
    assert {name: (r["width"], r["height"]) for name, r in job["renditions"].items()} == expected
    for name, rendition in job["renditions"].items():
        served = requests.get(pipeline.base_url + rendition["url"], timeout=10)
        assert served.status_code == 200
        assert served.headers["Content-Type"] == "image/jpeg"
        assert len(served.content) == rendition["bytes"]
        image = Image.open(io.BytesIO(served.content))
        assert image.size == expected[name]
        assert not image.getexif() and b"Exif" not in served.content
        on_disk = os.path.join(pipeline.root, rendition["url"].lstrip("/"))
        with open(on_disk, "rb") as handle:
            assert handle.read() == served.content
    # And the queue is empty: the job was acked
    assert pipeline.queue_depth() == 0
    assert pipeline.dead_letters() == []


def test_a_raw_body_upload_is_identified_by_its_bytes_not_its_content_type(pipeline):
    pipeline.start_api()
    pipeline.start_worker()
    png = samples.encode(samples.photo(300, 200), "PNG")
    response = pipeline.upload(data=png, headers={"Content-Type": "text/plain"})
    assert response.status_code == 202, response.text
    job = pipeline.wait_job(response.json()["id"])
    assert job["original"]["format"] == "png"
    assert job["renditions"]["large"]["width"] == 300   # never enlarged


def test_an_upload_is_stored_byte_for_byte_before_the_202(pipeline):
    pipeline.start_api()   # no worker: the job stays queued
    data = samples.jpeg(640, 480)
    response = pipeline.upload(data)
    assert response.status_code == 202
    job_id = response.json()["id"]
    with open(os.path.join(pipeline.root, "originals", job_id), "rb") as handle:
        assert handle.read() == data
    assert pipeline.job(job_id)["state"] == "queued"
    assert pipeline.queue_depth() == 1


TWO_FILES = {"files": [("file", ("a.jpg", samples.jpeg(32, 32))), ("file", ("b.jpg", samples.jpeg(32, 32)))]}


@pytest.mark.parametrize("kwargs, status, message", [
    ({"data": b""}, 400, "no image"),
    ({"files": {"other": ("a.jpg", samples.jpeg(32, 32))}}, 400, "exactly one form field named 'file'"),
    (TWO_FILES, 400, "exactly one form field named 'file' (this request has 2)"),
    ({"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}, 400, "malformed"),
    ({"data": b"x" * 300_001}, 413, "at most 300000 are accepted"),
    ({"data": b"just some text, not an image"}, 415, "not an image in a format"),
    ({"data": b'<svg xmlns="http://www.w3.org/2000/svg"></svg>'}, 415, "not an image"),
    ({"data": samples.png_header_only(30000, 10)}, 422, "largest side accepted is 20000"),
    ({"data": samples.png_header_only(8000, 8000)}, 422, "at most 50000000 are accepted"),
    ({"data": b"\xff\xd8\xff\xe0" + b"\x00" * 20}, 422, "jpeg header cannot be read"),
])
def test_bad_uploads_get_a_clear_4xx_and_leave_nothing_behind(make_pipeline, kwargs, status, message):
    pipeline = make_pipeline(api={"max_upload_bytes": "300000"})
    pipeline.start_api()
    response = pipeline.upload(**kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert pipeline.stored_jobs() == [] and pipeline.stored_originals() == []
    assert pipeline.queue_depth() == 0


def test_a_multipart_file_name_with_dots_and_slashes_is_ignored(pipeline):
    pipeline.start_api()
    response = pipeline.upload(files={"file": ("../../etc/passwd", samples.jpeg(64, 64))})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert pipeline.stored_originals() == [job_id]
    assert not os.path.exists(os.path.join(pipeline.workdir, "etc"))


def test_unknown_jobs_and_renditions_are_404_and_wrong_methods_405(pipeline):
    pipeline.start_api()
    for path in ("/jobs/0123456789abcdef0123456789abcdef", "/jobs/../../etc/passwd",
                 "/renditions/0123456789abcdef0123456789abcdef/large.jpg", "/nothing"):
        response = requests.get(pipeline.base_url + path, timeout=10)
        assert response.status_code == 404, path
        assert "error" in response.json()
    response = requests.get(pipeline.base_url + "/upload", timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "POST, OPTIONS"


def test_healthz_is_200_while_the_broker_is_reachable(pipeline):
    pipeline.start_api()
    response = requests.get(pipeline.base_url + "/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "broker": "reachable"}


def test_imgworker_submit_wait_prints_the_202_and_then_the_finished_job(pipeline, tmp_path):
    pipeline.start_api()
    pipeline.start_worker()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(samples.jpeg(1000, 800))
    result = subprocess.run([sys.executable, "-m", "imgworker", "--config", pipeline.config_path,
                             "submit", str(photo), "--wait"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    accepted, finished = result.stdout.split("\n", 1)
    assert json.loads(accepted)["http_status"] == 202
    job = json.loads(finished)
    assert job["state"] == "done"
    assert job["renditions"]["large"]["width"] == 1000


def test_originals_and_job_records_are_private_and_renditions_public(pipeline):
    # Given a job that is done
    pipeline.start_api()
    pipeline.start_worker()
    job_id = pipeline.upload(samples.jpeg(400, 300)).json()["id"]
    job = pipeline.wait_job(job_id)
    assert job["state"] == "done"
    mode = lambda *parts: os.stat(os.path.join(pipeline.root, *parts)).st_mode & 0o777  # noqa: E731
    # Then no other local user can list or read originals and job records
    # (GPS and all), while nginx (another user) can read every rendition
    assert mode("originals") == mode("jobs") == 0o700
    assert mode("originals", job_id) & 0o077 == 0
    assert mode("jobs", job_id + ".json") & 0o077 == 0
    assert mode("renditions") == mode("renditions", job_id) == 0o755
    for rendition in job["renditions"].values():
        assert mode(*rendition["url"].lstrip("/").split("/")) == 0o644


def test_with_several_broker_urls_the_api_and_worker_use_one_that_answers(make_pipeline, amqp_url):
    # Given [broker] url naming a node that is down (nothing listens on its
    # port) and one that answers, as for a cluster with one node lost
    dead = amqp_url.replace(urlsplit(amqp_url).netloc.rsplit("@", 1)[1], f"127.0.0.1:{free_port()}")
    pipeline = make_pipeline(broker={"url": f"{dead}, {amqp_url}"})
    pipeline.start_api()
    pipeline.start_worker()
    # When uploads arrive (each connection tries the nodes in a shuffled order)
    ids = [pipeline.upload(samples.jpeg(400, 300)).json()["id"] for _ in range(6)]
    # Then every one is accepted and done
    assert [pipeline.wait_job(job_id)["state"] for job_id in ids] == ["done"] * 6
