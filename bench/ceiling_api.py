"""The ceiling of the ingest path: what nginx, gunicorn and wrk allow on
these cores when the API does nothing with an upload.

A WSGI app under gunicorn with the shipped API's worker class, processes
and threads (and its unit's environment), that reads the body as the API
does (imgworker.api's reader) and answers 202: nothing is stored, nothing
is queued, nothing promised. No design that keeps imgworker's promises can
go faster on the same machine; the ratio of imgworker to this says how much
of the stack's capacity the API's own work takes.

    gunicorn -k gthread -w W --threads T -b 127.0.0.1:PORT 'bench.ceiling_api:app()'
"""

import json
import os
import uuid

from imgworker import config
from imgworker.api import _read_length

#: The shipped API's wait for a body that stops arriving.
BODY_TIMEOUT = config.load(os.devnull).api.body_timeout


def app():
    def application(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        _read_length(environ, length, BODY_TIMEOUT)
        body = json.dumps({"id": uuid.uuid4().hex}).encode()
        start_response("202 Accepted", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return application
