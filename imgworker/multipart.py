"""multipart/form-data, parsed in one linear pass over a body in memory.

The upload route needs one thing from a form: the bytes of the field named
``file``. The standard library's ``email`` parser, used before, is made for
trusted mail, not hostile HTTP bodies: a part header with many ';' costs it
CPU quadratic in their number (it appends a defect per parameter), an
unbalanced quote is quadratic too, and deeply nested multiparts raised
RecursionError (a 500). It also built every part in memory, several copies
of the largest upload.
(Debian's python3-multipart is a streaming parser, but its API differs
between the releases imgworker supports, and the body is already in memory.)

Here every step is a ``bytes.find`` bounded by the body's length or a small
constant, parts are never parsed recursively, their count and header size are
capped, and only the wanted field is copied out: the time is linear in the
body's size and the memory one copy of the file.
"""

import re
from dataclasses import dataclass

#: A browser's form has a field or two; a body with more is not one of ours.
MAX_PARTS = 16
#: A part's headers (Content-Disposition, Content-Type) fit in far less.
MAX_PART_HEADERS = 8192
#: RFC 2046: a boundary is 1 to 70 characters.
_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
#: One parameter of Content-Disposition: name="value" (backslash escapes
#: allowed) or name=token. No nested quantifiers: linear in the header.
_PARAMETER = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


class MalformedMultipart(ValueError):
    """The body is not a multipart/form-data body this parser takes; the
    message says what is wrong, for the client."""


@dataclass(frozen=True)
class _Part:
    name: str
    start: int      # the part's data is body[start:end]
    end: int


def boundary(content_type):
    match = _BOUNDARY.search(content_type)
    if not match:
        raise MalformedMultipart("its Content-Type has no boundary")
    return (match.group(1) or match.group(2)).encode("latin-1")


def _field_name(headers):
    """The name= of the part's Content-Disposition: form-data header."""
    for line in headers.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"content-disposition":
            value = value.decode("latin-1")
            if value.strip().split(";", 1)[0].strip().lower() != "form-data":
                raise MalformedMultipart("a part is not form-data")
            for match in _PARAMETER.finditer(value):
                if match.group(1).lower() == "name":
                    quoted = match.group(2)
                    return re.sub(r"\\(.)", r"\1", quoted) if quoted is not None \
                        else match.group(3)
            return None
    raise MalformedMultipart("a part has no Content-Disposition header")


def _parts(body, content_type):
    delimiter = b"--" + boundary(content_type)
    # The first delimiter opens the body, or follows a preamble and a CRLF.
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise MalformedMultipart("its boundary never occurs")
        position = found + 2 + len(delimiter)
    parts = []
    while True:
        if body.startswith(b"--", position):
            return parts                      # the closing delimiter
        # After a delimiter: optional transport padding, then CRLF.
        line_end = body.find(b"\r\n", position, position + 128)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MalformedMultipart("a boundary line is not followed by a line break")
        headers_start = line_end + 2
        if body.startswith(b"\r\n", headers_start):
            headers_end = headers_start       # a part without headers
            data_start = headers_start + 2
        else:
            headers_end = body.find(b"\r\n\r\n", headers_start,
                                    headers_start + MAX_PART_HEADERS)
            if headers_end < 0:
                raise MalformedMultipart(f"a part's headers do not end within "
                                         f"{MAX_PART_HEADERS} bytes")
            data_start = headers_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise MalformedMultipart("it ends before its closing boundary")
        if len(parts) == MAX_PARTS:
            raise MalformedMultipart(f"it has more than {MAX_PARTS} parts")
        parts.append(_Part(_field_name(body[headers_start:headers_end]), data_start, data_end))
        position = data_end + 2 + len(delimiter)


def field_bounds(body, content_type, name):
    """(start, end): the one field called ``name`` is body[start:end], for a
    caller that cuts the body to it in place instead of copying it out.
    Raises MalformedMultipart, or LookupError(count) unless exactly one
    exists."""
    matching = [part for part in _parts(body, content_type) if part.name == name]
    if len(matching) != 1:
        raise LookupError(len(matching))
    return matching[0].start, matching[0].end


def form_field(body, content_type, name):
    """The bytes of the one field called ``name`` (see field_bounds)."""
    start, end = field_bounds(body, content_type, name)
    return body[start:end]
