"""The straightforward ingest design, kept fixed as the ingest baseline.

What a first version of the API looks like: a WSGI app under gunicorn's
sync workers that parses the multipart form, writes and fsyncs the file,
then publishes one persistent message and waits for its confirm before
answering 202. Same durability promise as imgworker's API, none of its
engineering; it is never shipped, only measured beside the real one.

    gunicorn -w 2 -b 127.0.0.1:PORT 'bench.baseline_api:app(ROOT, AMQP_URL, QUEUE)'
"""

import email.parser
import email.policy
import json
import os
import uuid

import pika


def app(root, amqp_url, queue):
    os.makedirs(root, exist_ok=True)
    state = {}

    def channel():
        if "channel" not in state:
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
            state["channel"] = connection.channel()
            state["channel"].queue_declare(queue, durable=True)
            state["channel"].confirm_delivery()
        return state["channel"]

    def application(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        head = f"Content-Type: {environ.get('CONTENT_TYPE', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            head + environ["wsgi.input"].read(length))
        part = next(message.iter_parts())
        data = part.get_payload(decode=True)
        job_id = uuid.uuid4().hex
        with open(os.path.join(root, job_id), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        channel().basic_publish("", queue, json.dumps({"id": job_id}).encode(),
                                pika.BasicProperties(delivery_mode=2), mandatory=True)
        body = json.dumps({"id": job_id}).encode()
        start_response("202 Accepted", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return application
