"""A corpus of awkward and hostile uploads, made here (nothing downloaded),
through one API and one worker: each gets a clear 4xx at upload or ends
`failed` with a reason a person can read, or -- for valid but unusual images --
`done` with correct renditions. Never a 5xx, never a worker crash or restart,
never EXIF or GPS in an output.
"""

import io
import os

import requests
from PIL import Image

from harness import samples

#: Bigger than anything the API accepts: bombs must be refused from the header.
BOMB_1BIT = (20000, 20000)
#: 144 MP: under Pillow's own bomb error (2 x 89 MP) but over our 50 MP cap.
PILLOW_ALLOWS = (12000, 12000)


def _rotated_with_gps():
    exif = Image.Exif()
    exif[samples.ORIENTATION] = 6
    exif.get_ifd(samples.GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    exif[0x010F] = "TestCam"
    return samples.encode(samples.photo(1200, 800), "JPEG", quality=90, exif=exif.tobytes())


def _corpus():
    png = lambda image, **kw: samples.encode(image, "PNG", **kw)  # noqa: E731
    palette = Image.new("P", (300, 200), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 150, 200))
    rgba = samples.photo(400, 300).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((400, 300)))
    jpeg = samples.jpeg(640, 480)
    # name -> (request kwargs, expected: an HTTP status, or a final job state)
    return {
        "0-byte file": ({"data": b""}, 400),
        "text": ({"data": b"hello, I am not an image\n" * 10}, 415),
        "SVG/XML": ({"data": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" '
                             b'width="10" height="10"/>'}, 415),
        "PSD": ({"data": b"8BPS\x00\x01\x00\x00\x00\x00\x00\x00\x00\x03" + b"\x00" * 64}, 415),
        "truncated JPEG": ({"data": samples.truncated_jpeg()}, "failed"),
        "JPEG with a corrupt scan": ({"data": samples.corrupt_scan_jpeg()}, "done or failed"),
        "PNG bomb 20000x20000 1-bit": ({"data": png(Image.new("1", BOMB_1BIT))}, 422),
        "144 MP PNG (under Pillow's limit)": ({"data": png(Image.new("1", PILLOW_ALLOWS))}, 422),
        "width 0": ({"data": samples.png_header_only(0, 100)}, 422),
        "height 0": ({"data": samples.png_header_only(100, 0)}, 422),
        "huge declared size, tiny body": ({"data": samples.png_header_only(19000, 19000)}, 422),
        "7000x7000 declared, tiny body": ({"data": samples.png_header_only(7000, 7000)}, "failed"),
        "CMYK JPEG": ({"data": samples.encode(samples.photo(500, 400).convert("CMYK"), "JPEG")}, "done"),
        "16-bit PNG": ({"data": png(Image.new("I;16", (300, 200), 0x8000))}, "done"),
        "palette PNG with transparency": ({"data": png(palette, transparency=0)}, "done"),
        "RGBA PNG to JPEG renditions": ({"data": png(rgba)}, "done"),
        "300-frame animated GIF": ({"data": samples.animated_gif(300)}, "done"),
        "progressive JPEG, 2000 scans": ({"data": samples.many_scans_jpeg(2000)}, 422),
        "EXIF-rotated JPEG with GPS": ({"data": _rotated_with_gps()}, "done"),
        "wrong Content-Type": ({"data": jpeg, "headers": {"Content-Type": "image/png"}}, "done"),
        "multipart with ../ file name": ({"files": {"file": ("../../../etc/passwd", jpeg)}}, "done"),
        "two files in one request": ({"files": [("file", ("a.jpg", jpeg)), ("file", ("b.jpg", jpeg))]},
                                     400),
    }


def test_the_bad_input_corpus_gets_clear_answers_and_no_worker_falls_over(make_pipeline):
    pipeline = make_pipeline(worker={"job_timeout": "20"})
    pipeline.start_api()
    worker = pipeline.start_worker()
    worker_pid = worker.process.pid
    results, problems = [], []
    for name, (kwargs, expected) in _corpus().items():
        response = pipeline.upload(**kwargs)
        if response.status_code >= 500:
            problems.append(f"{name}: HTTP {response.status_code} {response.text}")
            continue
        if response.status_code != 202:
            outcome = f"{response.status_code} {response.json()['error']}"
            if response.status_code != expected:
                problems.append(f"{name}: expected {expected}, got {outcome}")
            results.append((name, outcome))
            continue
        job = pipeline.wait_job(response.json()["id"], timeout=60)
        outcome = job["state"] + (f": {job['error']}" if job["state"] == "failed" else
                                  " " + ", ".join(f"{n} {r['width']}x{r['height']}"
                                                  for n, r in job["renditions"].items()))
        results.append((name, outcome))
        if job["state"] not in str(expected).split(" or "):
            problems.append(f"{name}: expected {expected}, got {outcome}")
        if job["state"] == "failed":
            assert job["error"] and len(job["error"]) > 20, job
        for rendition in job.get("renditions", {}).values():
            served = requests.get(pipeline.base_url + rendition["url"], timeout=10).content
            image = Image.open(io.BytesIO(served))
            image.load()
            if image.size != (rendition["width"], rendition["height"]):
                problems.append(f"{name}: {rendition['url']} is {image.size}")
            if image.getexif() or b"TestCam" in served or b"Exif" in served:
                problems.append(f"{name}: {rendition['url']} carries EXIF")
    print("\n".join(f"{name:38} {outcome}" for name, outcome in results))
    assert problems == []
    # The EXIF-rotated 1200x800 photo came out upright (portrait)
    assert dict(results)["EXIF-rotated JPEG with GPS"].startswith("done large 800x1200")
    # And the one worker never died or restarted, and is still healthy
    assert worker.process.poll() is None and worker.process.pid == worker_pid
    assert "Traceback" not in pipeline.services[0].log()   # the API never hit a bug
    good = pipeline.upload(samples.jpeg(800, 600)).json()["id"]
    assert pipeline.wait_job(good)["state"] == "done"
    assert not os.path.exists(os.path.join(pipeline.workdir, "etc", "passwd"))
