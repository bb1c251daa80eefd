import time

import pytest
import requests

from imgworker import multipart


def encoded(files, data=None):
    """A body and Content-Type exactly as the requests library sends them."""
    prepared = requests.Request("POST", "http://x/upload", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def timed(function, *args):
    started = time.process_time()
    try:
        return function(*args), time.process_time() - started
    except Exception as error:  # noqa: BLE001 - the test looks at it
        return error, time.process_time() - started


def test_the_file_field_comes_back_byte_for_byte_beside_other_fields():
    image = bytes(range(256)) * 1000 + b"\r\n--not-the-boundary\r\n"
    body, content_type = encoded({"file": ("photo.jpg", image, "image/jpeg")},
                                 data={"caption": "a dog"})
    assert multipart.form_field(body, content_type, "file") == image


def test_a_preamble_a_quoted_boundary_and_a_part_without_content_type_are_fine():
    body = (b"ignored preamble\r\n--b:1 2\r\n"
            b'Content-Disposition: form-data; name="file"; filename="a;b.jpg"\r\n\r\n'
            b"DATA\r\n--b:1 2--\r\nepilogue")
    assert multipart.form_field(body, 'multipart/form-data; boundary="b:1 2"', "file") == b"DATA"


@pytest.mark.parametrize("files, count", [
    ({"other": ("a.jpg", b"x")}, 0),
    ([("file", ("a.jpg", b"x")), ("file", ("b.jpg", b"y"))], 2),
])
def test_anything_but_exactly_one_file_field_is_counted(files, count):
    body, content_type = encoded(files)
    with pytest.raises(LookupError) as error:
        multipart.form_field(body, content_type, "file")
    assert error.value.args == (count,)


@pytest.mark.parametrize("body, content_type, reason", [
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nDATA", "multipart/form-data; boundary=b",
     "ends before its closing boundary"),
    (b"no delimiter here", "multipart/form-data; boundary=b", "boundary never occurs"),
    (b"--b\r\n\r\nDATA\r\n--b--", "multipart/form-data; boundary=b", "no Content-Disposition"),
    (b"x", "multipart/form-data", "no boundary"),
    (b"--b\r\nContent-Disposition: attachment; name=\"file\"\r\n\r\nD\r\n--b--",
     "multipart/form-data; boundary=b", "not form-data"),
])
def test_a_malformed_body_says_what_is_wrong(body, content_type, reason):
    with pytest.raises(multipart.MalformedMultipart, match=reason):
        multipart.form_field(body, content_type, "file")


# -- hostile bodies: each answered in bounded time, never a RecursionError ----------
CT = "multipart/form-data; boundary=b"


def hostile_bodies():
    head = b"--b\r\nContent-Disposition: form-data; name=\"file\""
    return {
        # 40,000 ';' in one header cost the email parser ~12 s
        "40,000 semicolons": head + b";" * 40_000 + b"\r\n\r\nD\r\n--b--",
        "an unbalanced quote then semicolons": head + b'; filename="' + b";" * 40_000 + b"\r\n\r\nD\r\n--b--",
        "semicolons within 8 KiB": head + b";" * 8000 + b"\r\n\r\nD\r\n--b--",
        "1,000 nested multiparts": b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(1000)).replace(b"--b0", b"--b", 1) + b"\r\n--b--",
        "100,000 tiny parts": (head + b"\r\n\r\nD\r\n") * 100_000 + b"--b--",
        "25 MB of short lines in the file": head + b"\r\n\r\n" + b"a\r\n" * ((25 << 20) // 3) + b"\r\n--b--",
        "25 MB of near-boundaries": head + b"\r\n\r\n" + b"\r\n--" * ((25 << 20) // 4) + b"\r\n--b--",
    }


@pytest.mark.parametrize("name", list(hostile_bodies()))
def test_a_hostile_body_costs_time_linear_in_its_size(name):
    body = hostile_bodies()[name]
    result, seconds = timed(multipart.form_field, body, CT, "file")
    assert not isinstance(result, RecursionError)
    assert isinstance(result, (bytes, multipart.MalformedMultipart, LookupError)), result
    # ~20 MB/s would already be slow for bytes.find; 12 s was the old cost of 40 KB
    assert seconds < 0.1 + len(body) / 20e6, f"{name}: {seconds:.2f} s for {len(body)} bytes"
