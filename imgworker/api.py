"""The producer: a small WSGI app that accepts uploads and answers job status.

    POST /upload                  202 + Location: /jobs/<id>, once the original
                                  is fsynced and the broker confirmed the job
    GET  /jobs/<id>               the job's state (queued|processing|done|failed)
    GET  /renditions/<id>/<file>  a rendition (nginx serves these in production)
    GET  /healthz                 200 when the broker is reachable, else 503
    GET  /metrics                 Prometheus metrics of this host's API and
                                  workers (nginx answers 404 for it: a
                                  scraper asks the API's own address)

Every error is JSON ``{"error": "..."}`` with a status a client can act on:
400 malformed, 413 too large, 415 not an accepted image, 422 over the size
limits or an unreadable header, 503 + Retry-After when the broker cannot take
the job or this process holds [api] max_body_memory of bodies already, 507
when storage is full; to a client reaching the API without nginx, 411 for a
chunked body and 408 for one that stops arriving. Bad input never gets a 5xx.
"""

import io
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus

from . import auth, broker, erasure, formats, images, ingest, metrics, multipart
from .storage import LockTimeout, Storage, StorageFull, is_job_id

logger = logging.getLogger(__name__)

#: path (matched whole) -> {method: the Api method answering}; the
#: pattern's groups are that method's arguments.
_ROUTES = (
    (re.compile(r"/upload"), {"POST": "upload", "OPTIONS": "preflight"}),
    (re.compile(r"/grants"), {"POST": "grant"}),
    (re.compile(r"/jobs/(.*)"), {"GET": "job_status", "HEAD": "job_status",
                                 "DELETE": "delete_job"}),
    (re.compile(r"/owners/(.+)/jobs"), {"DELETE": "delete_owner_jobs"}),
    (re.compile(r"/renditions/(.*)"), {"GET": "rendition", "HEAD": "rendition"}),
    (re.compile(r"/healthz"), {"GET": "health", "HEAD": "health"}),
    (re.compile(r"/metrics"), {"GET": "metrics", "HEAD": "metrics"}),
    # nginx's auth_request, never proxied from a client (see
    # nginx/snippets/imgworker-locations.conf)
    (re.compile(r"/auth/upload"), {"GET": "auth_upload"}),
)
#: Where a page of a listed origin (``[auth] cors_origins``) may read the answers.
_CORS_PATHS = re.compile(r"/upload|/jobs/.*")
#: The largest POST /grants body: a few fields.
_MAX_GRANT_REQUEST = 4096
_RENDITION_FILE = re.compile(r"([0-9a-f]{32})/([a-z0-9][a-z0-9_-]*)\.("
                             + "|".join(map(re.escape, formats.BY_EXTENSION)) + ")")


@dataclass
class Response:
    """What a handler answers: a JSON body, or an open file to stream."""
    status: HTTPStatus
    body: object = None               # a JSON-able value, bytes, or a binary file
    headers: list = field(default_factory=list)
    content_type: str = "application/json"


def _chunks(file):
    """A file as a WSGI body, closed when done (servers without file_wrapper)."""
    with file:
        yield from iter(lambda: file.read(65536), b"")


def _declared(text):
    """A Content-Length header's value as a number, or None."""
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _refusal(refusal):
    """The answer to a request its credentials do not allow (auth.REASONS):
    JSON with the reason a client's code can act on; 401 names the scheme
    (RFC 6750). Nothing says which keys exist."""
    headers = []
    if refusal.status == 401:
        error = "" if refusal.reason == "missing" else ', error="invalid_token"'
        headers.append(("WWW-Authenticate", f'Bearer realm="imgworker"{error}'))
    elif refusal.reason == "scope":
        headers.append(("WWW-Authenticate", 'Bearer realm="imgworker", error="insufficient_scope"'))
    return Response(HTTPStatus(refusal.status), {"error": str(refusal), "reason": refusal.reason},
                    headers)


class HTTPError(Exception):
    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.headers = list(headers)


def _respond(environ, start_response, response):
    """The one place a response is written: status line, common headers,
    the body (none for HEAD)."""
    status = response.status
    if response.content_type == "application/json":
        data = json.dumps(response.body).encode() + b"\n"
        body, length = [data], len(data)
        headers = [("Cache-Control", "no-store")]
    elif isinstance(response.body, bytes):
        body, length, headers = [response.body], len(response.body), [("Cache-Control", "no-store")]
    else:
        file = response.body
        length = os.fstat(file.fileno()).st_size
        wrapper = environ.get("wsgi.file_wrapper")
        body, headers = (wrapper(file) if wrapper else _chunks(file)), []
    content = [("Content-Type", response.content_type)]
    if status is HTTPStatus.NO_CONTENT:
        body, length, headers, content = [], 0, [], []
    start_response(f"{status.value} {status.phrase}", [
        *content,
        ("Content-Length", str(length)),
        *headers,
        *response.headers,
    ])
    if environ["REQUEST_METHOD"] == "HEAD":
        if hasattr(response.body, "close"):
            response.body.close()
        return [b""]
    return body


#: What one recv_into() takes at most: a socket buffer's worth or so. The
#: body grows by what arrives, never by what the client declared.
_READ_CHUNK = 256 << 10


class _BodyTimeout(Exception):
    """The client sent nothing of its body for [api] body_timeout seconds."""


def _read_length(environ, length, timeout, keep=True):
    """``length`` bytes of a request body (bytes or a bytearray), or, with
    ``keep`` false, that many read and dropped (None). Raises _BodyTimeout.

    gunicorn up to at least 23 (Debian 12 ships 20.1, Debian 13 23.0) reads
    a body 1 KiB at a time, copying the rest of each received 8 KiB chunk
    back into a buffer on every turn: work that grows with the body, and for
    a photo-sized upload more than all the rest costs the API (the bench's
    "Ingest" section has the figures). It also waits for a body with no
    timeout. Its body object keeps the length-bounded reader as ``.reader``;
    while nothing is buffered in front of it, the body is taken from the
    socket reader under that (_read_from_socket), else from the
    length-bounded reader at once. Any other server, or a gunicorn without
    those attributes, gets the plain read(), and its own timeouts.
    """
    stream = environ["wsgi.input"]
    reader, buffered = getattr(stream, "reader", None), getattr(stream, "buf", None)
    if (type(stream).__module__ == "gunicorn.http.body" and hasattr(reader, "read")
            and buffered is not None and buffered.tell() == 0):
        body = _read_from_socket(reader, length, timeout, keep)
        if body is not False:
            return body
        stream = reader
    if keep:
        return stream.read(length)
    while length > 0 and (chunk := stream.read(min(length, _READ_CHUNK))):
        length -= len(chunk)
    return None


def _read_from_socket(reader, length, timeout, keep):
    """The body straight from the connection's socket: what gunicorn already
    read past the headers, then recv_into() for the rest, each wait at most
    ``timeout`` seconds. gunicorn 20.1 and 23 recv() it 8 KiB at a time,
    each chunk copied twice, so a photo-sized upload is many calls and
    copies where one recv_into() per received chunk will do. The body grows
    as data arrives: a client that declares 25 MiB and sends one byte costs
    one chunk, not 25 MiB. On a timeout the connection is shut for reading,
    so gunicorn, which would wait for the rest of the body with no timeout
    to skip it, finds its end at once and closes. False unless gunicorn's
    reader is the one this knows: a LengthReader for exactly ``length`` over
    a SocketUnreader."""
    unreader = getattr(reader, "unreader", None)
    sock = getattr(unreader, "sock", None)
    if (type(reader).__name__ != "LengthReader" or getattr(reader, "length", None) != length
            or type(unreader).__name__ != "SocketUnreader"
            or not isinstance(getattr(unreader, "buf", None), io.BytesIO)
            or not isinstance(sock, socket.socket)):
        return False
    held = unreader.buf.getvalue()
    unreader.buf = io.BytesIO()
    received = min(len(held), length)
    body = bytearray(held[:received]) if keep else None
    unreader.buf.write(held[received:])       # a pipelined next request
    scratch = memoryview(bytearray(min(_READ_CHUNK, length - received)))
    sock.settimeout(timeout)
    try:
        while received < length:
            count = sock.recv_into(scratch, min(len(scratch), length - received))
            if not count:
                break                         # the client gave up: a short body
            if keep:
                body += scratch[:count]
            received += count
    except (TimeoutError, ConnectionError):
        reader.length = 0
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        raise _BodyTimeout() from None
    finally:
        sock.settimeout(None)
    reader.length -= received
    return body


class _Budget:
    """The body bytes one process holds at once ([api] max_body_memory): an
    upload is admitted on its declared length before its body is read, and
    returns its share once answered. One upload is always admitted when
    nothing else is in flight, so the largest legal one always fits."""

    def __init__(self, limit):
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def take(self, size):
        with self._lock:
            if self._held and self._held + size > self.limit:
                return False
            self._held += size
            return True

    def give(self, size):
        with self._lock:
            self._held -= size


class Api:
    """The WSGI application. One instance per gunicorn worker process, called
    from several threads, which share one broker connection made on first
    use, after the fork (a pika connection must never be shared across
    fork()); broker.GroupPublisher has one thread at a time use it."""

    def __init__(self, config):
        self.config = config
        self.storage = Storage(config.storage.root)
        self.limits = images.Limits.from_config(config)
        self._publisher_lock = threading.Lock()
        self._publisher, self._publisher_pid = None, None
        self._bodies = _Budget(config.api.max_body_memory << 20)
        self.gate = auth.Gatekeeper(config)

    @property
    def publisher(self):
        """This process's GroupPublisher, made after the fork."""
        with self._publisher_lock:
            if self._publisher_pid != os.getpid():
                self._publisher = broker.GroupPublisher(broker.Publisher(self.config))
                self._publisher_pid = os.getpid()
            return self._publisher

    # -- WSGI -----------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        started = time.monotonic()
        try:
            response = self._route(environ, method, path)
        except HTTPError as error:
            response = Response(error.status, {"error": str(error)}, error.headers)
        except auth.Refusal as refusal:
            metrics.count_auth_refusal(refusal.reason)
            response = _refusal(refusal)
        except Exception:
            logger.exception("Unexpected error answering %s %s.", method, path)
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                {"error": "internal error; see the API's log"})
        if path == "/upload" and method == "POST":
            metrics.count_upload(response.status.value, time.monotonic() - started)
        if self.config.auth.cors_origins and _CORS_PATHS.fullmatch(path):
            response.headers += self._cors(environ)
        return _respond(environ, start_response, response)

    def _route(self, environ, method, path):
        for pattern, methods, in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if method not in methods:
                    raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here",
                                    [("Allow", ", ".join(methods))])
                return getattr(self, methods[method])(environ, *match.groups())
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    # -- CORS ---------------------------------------------------------------------
    def _cors(self, environ):
        """A listed origin's page may read this answer (and its Location);
        any other origin gets no Access-Control-* header, so its browser
        keeps the answer from it. The origin is echoed, never "*": the
        requests carry credentials."""
        headers = [("Vary", "Origin")]
        origin = environ.get("HTTP_ORIGIN")
        if origin in self.config.auth.cors_origins:
            headers += [("Access-Control-Allow-Origin", origin),
                        ("Access-Control-Expose-Headers", "Location")]
        return headers

    def preflight(self, environ):
        """OPTIONS /upload: a browser asking whether a page may POST with an
        Authorization header. The answer's Allow-Origin comes from _cors."""
        headers = [("Allow", "POST, OPTIONS")]
        if environ.get("HTTP_ORIGIN") in self.config.auth.cors_origins:
            headers += [("Access-Control-Allow-Methods", "POST"),
                        ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                        ("Access-Control-Max-Age", "600")]
        return Response(HTTPStatus.NO_CONTENT, headers=headers)

    # -- credentials ------------------------------------------------------------------
    def auth_upload(self, environ):
        """GET /auth/upload, nginx's auth_request before it reads an upload's
        body: the original request's headers decide, as /upload's own check
        would. 204 lets it through. A refusal is 401 or 403 (auth_request
        passes no other status on) with the answer nginx gives the client in
        headers: X-Imgworker-Refusal (the reason, which picks the status:
        too_large is 413), X-Imgworker-Refusal-Body (the JSON),
        WWW-Authenticate and CORS. nginx words it itself rather than asking
        again: a proxied error page would read the whole body first."""
        original = {"HTTP_AUTHORIZATION": environ.get("HTTP_AUTHORIZATION", ""),
                    "QUERY_STRING": environ.get("HTTP_X_ORIGINAL_URI", "").partition("?")[2]}
        if environ.get("HTTP_X_ORIGINAL_METHOD") == "OPTIONS":
            return Response(HTTPStatus.NO_CONTENT)
        try:
            self.gate.admit(original, "upload", _declared(environ.get(
                "HTTP_X_ORIGINAL_CONTENT_LENGTH")))
        except auth.Refusal as refusal:
            metrics.count_auth_refusal(refusal.reason)
            answer = _refusal(refusal)
            # auth_request hands a 401's WWW-Authenticate on by itself, a
            # 403's not: that one travels under another name.
            challenges = [(name if refusal.status == 401 else "X-Imgworker-Challenge", value)
                          for name, value in answer.headers]
            status = HTTPStatus.UNAUTHORIZED if refusal.status == 401 else HTTPStatus.FORBIDDEN
            return Response(status, headers=[
                ("X-Imgworker-Refusal", refusal.reason),
                ("X-Imgworker-Refusal-Body", json.dumps(answer.body)),
                *challenges, *self._cors(environ)])
        return Response(HTTPStatus.NO_CONTENT)

    def _owner(self, environ):
        """An upload's ?owner= (a key's upload says whose it is this way)."""
        owners = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("owner")
        if not owners:
            return None
        try:
            return auth.check_owner(owners[0])
        except ValueError as error:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"owner: {error}") from None

    # -- POST /grants -----------------------------------------------------------------
    def grant(self, environ):
        """An upload grant for the app's user, asked for with a key of scope
        grant: 201 {"grant", "expires_at", "upload_url"}."""
        self.gate.admit(environ, "grant")
        length = _declared(environ.get("CONTENT_LENGTH"))
        if length is None or length > _MAX_GRANT_REQUEST:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "send a JSON object of at most "
                            f"{_MAX_GRANT_REQUEST} bytes with a Content-Length")
        try:
            request = json.loads(self._read_body(environ, length))
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            raise HTTPError(HTTPStatus.BAD_REQUEST, 'send JSON: {"owner": "...", '
                            '"max_bytes": N, "ttl": SECONDS}') from None
        owner, max_bytes, ttl = request.get("owner"), request.get("max_bytes"), request.get("ttl")
        if not all(value is None or (type(value) in (int, float) and value > 0)
                   for value in (max_bytes, ttl)) or isinstance(max_bytes, float):
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY,
                            "max_bytes must be a whole number above 0, ttl a number of "
                            "seconds above 0")
        try:
            grant = self.gate.issue(owner, max_bytes, ttl)
        except ValueError as error:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None
        except LookupError as error:
            logger.error("Cannot sign an upload grant: %s", error)
            raise self._unavailable("upload grants are not set up on this server") from None
        return Response(HTTPStatus.CREATED, grant)

    def _unavailable(self, reason):
        return HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, reason,
                         [("Retry-After", str(self.config.api.retry_after))])

    # -- POST /upload -----------------------------------------------------------
    def _declared_length(self, environ):
        """The body's Content-Length, checked before any of it is read.
        A chunked body has none: nginx always sends one (it buffers the
        body first), so only a client reaching the API directly sends
        chunked, and gets 411."""
        limit = self.config.api.max_upload_bytes
        declared = environ.get("CONTENT_LENGTH") or ""
        if not declared:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the upload with a Content-Length")
        try:
            length = int(declared)
        except ValueError:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the upload is {length} bytes; at most {limit} are accepted")
        return length

    def _read_body(self, environ, length, keep=True):
        try:
            return _read_length(environ, length, self.config.api.body_timeout, keep)
        except _BodyTimeout:
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, "the upload's body stopped arriving for "
                            f"{self.config.api.body_timeout:g} s") from None

    @staticmethod
    def _file_from_multipart(content_type, body):
        """The field's bytes: the body itself, cut to them in place (no
        copy of the upload beside it)."""
        # The client's file name is ignored: ids and paths are ours.
        try:
            start, end = multipart.field_bounds(body, content_type, "file")
        except multipart.MalformedMultipart as error:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the multipart/form-data body is malformed: {error}") from None
        except LookupError as error:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "send exactly one form field named 'file' "
                                 f"(this request has {error.args[0]})") from None
        if not isinstance(body, bytearray):
            return body[start:end]
        del body[end:]
        del body[:start]        # a bytearray drops its head without moving the rest
        return body

    def upload(self, environ):
        caller = self.gate.admit(environ, "upload", _declared(environ.get("CONTENT_LENGTH")),
                                 self._owner(environ))
        length = self._declared_length(environ)
        if not self._bodies.take(length):
            self._read_body(environ, length, keep=False)    # the connection stays usable
            raise self._unavailable(f"this API process has {self.config.api.max_body_memory} MiB "
                                    "of uploads in flight ([api] max_body_memory); try again")
        try:
            return self._accept(environ, self._read_body(environ, length), caller)
        finally:
            self._bodies.give(length)

    def _accept(self, environ, body, caller):
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type.lower().startswith("multipart/"):
            data = self._file_from_multipart(content_type, body)
        else:  # the raw image bytes; the Content-Type header is not trusted
            data = body
        if not data:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "no image: send the bytes as the body, or as a "
                                 "multipart/form-data field named 'file'")
        try:
            info = images.identify(data, self.limits)
        except images.UnsupportedFormat as error:
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(error)) from None
        except images.BadImage as error:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, str(error)) from None

        # A grant is spent before the upload is stored, and given back if it
        # is not accepted: of two uploads racing with one grant, on any
        # processes or hosts, one is stored and the other refused.
        self.gate.spend(caller)
        try:
            job_id = self._ingest(data, info, caller.owner)
        except BaseException as error:
            # given back only if nothing was kept: a job a worker took
            # while the broker's confirm was late is the grant's one upload
            if not getattr(error, "job_kept", False):
                self.gate.unspend(caller)
            raise
        status_url = f"/jobs/{job_id}"
        return Response(HTTPStatus.ACCEPTED, {"id": job_id, "status_url": status_url},
                        [("Location", status_url)])

    def _ingest(self, data, info, owner):
        try:
            return ingest.accept(self.storage, self.publisher, data, info, owner)
        except StorageFull:
            raise HTTPError(HTTPStatus.INSUFFICIENT_STORAGE,
                            "the server's image storage is full; try again later",
                            [("Retry-After", str(self.config.api.retry_after))]) from None
        except broker.BrokerUnavailable as error:
            # The broker's own words (addresses, error names) went to the
            # log, not to the public.
            if getattr(error, "job_kept", False):
                unavailable = self._unavailable("the job queue did not confirm the job in "
                                                "time, though a worker has taken it; try "
                                                "again later")
            else:
                unavailable = self._unavailable("the job queue is unavailable; nothing was "
                                                "stored, try again later")
            unavailable.job_kept = getattr(error, "job_kept", False)
            raise unavailable from None

    # -- GET /jobs/<id> -------------------------------------------------------
    def job_status(self, _environ, job_id):
        job = self.storage.read_job(job_id)
        if job is None:
            if is_job_id(job_id) and self.storage.is_erased(job_id):
                raise HTTPError(HTTPStatus.GONE, f"job {job_id} was erased")
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no job with id {job_id!r}")
        return Response(HTTPStatus.OK, job.view())

    # -- DELETE /jobs/<id>, DELETE /owners/<owner>/jobs ---------------------------
    def delete_job(self, environ, job_id):
        """Erase a job (erasure.py): 200 once its files are gone, durably,
        and job.deleted is confirmed; 404 unknown, 410 erased before."""
        self.gate.admit(environ, "delete")
        result = self._erase(lambda eraser: eraser.erase([job_id])[job_id])
        if result is erasure.Result.UNKNOWN:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no job with id {job_id!r}")
        if result is erasure.Result.GONE:
            raise HTTPError(HTTPStatus.GONE, f"job {job_id} was erased before")
        return Response(HTTPStatus.OK, {"id": job_id, "erased": True})

    def delete_owner_jobs(self, environ, owner):
        """Erase every job of an owner: 200 {"owner", "erased": N}."""
        self.gate.admit(environ, "delete")
        try:
            auth.check_owner(owner)
        except ValueError as error:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"owner: {error}") from None
        erased = self._erase(lambda eraser: eraser.erase_owner(owner))
        return Response(HTTPStatus.OK, {"owner": owner, "erased": erased})

    def _erase(self, work):
        try:
            with erasure.Eraser(self.config, self.storage) as eraser:
                return work(eraser)
        except LockTimeout:
            raise self._unavailable("a worker is writing this job's files; try again") from None
        except broker.BrokerUnavailable as error:
            logger.warning("An erasure could not announce job.deleted (%s); the sweep or a "
                           "retry finishes it.", error)
            raise self._unavailable("the erasure has begun, but the event queue is "
                                    "unavailable; try again to finish it") from None

    # -- GET /renditions/... --------------------------------------------------
    def rendition(self, _environ, path):
        match = _RENDITION_FILE.fullmatch(path)
        if match:
            job_id, name, extension = match.groups()
            try:
                file = open(os.path.join(self.storage.rendition_dir(job_id),
                                         f"{name}.{extension}"), "rb")
            except FileNotFoundError:
                pass
            else:
                return Response(HTTPStatus.OK, file,
                                content_type=formats.BY_EXTENSION[extension].media_type)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no such rendition: /renditions/{path}")

    # -- GET /healthz -----------------------------------------------------------
    def health(self, _environ):
        try:
            self.publisher.check()
        except broker.BrokerUnavailable as error:
            logger.warning("Health check: the broker is unavailable: %s", error)
            raise self._unavailable("the job queue is unavailable") from None
        return Response(HTTPStatus.OK, {"status": "ok", "broker": "reachable"})

    # -- GET /metrics ------------------------------------------------------------
    def metrics(self, _environ):
        return Response(HTTPStatus.OK, metrics.exposition(self.config),
                        content_type=metrics.CONTENT_TYPE)
