"""A webhook receiver for the booted containers (standard library only):

    python3 webhook_receiver.py FILE                 answer 200 on 127.0.0.1:8099,
                                                     appending "<signature> <body>" lines to FILE
    python3 webhook_receiver.py --verify SECRET ID   read FILE's lines on stdin: exit 0 if the
                                                     job.done event of job ID came, validly signed
"""

import hashlib
import hmac
import http.server
import json
import sys


def serve(path):
    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with open(path, "ab") as handle:
                handle.write(self.headers["Imgworker-Signature"].encode() + b" " + body + b"\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
    http.server.HTTPServer(("127.0.0.1", 8099), Receiver).serve_forever()


def verify(secret, job_id, lines):
    for line in lines:
        signature, body = line.rstrip(b"\n").split(b" ", 1)
        event = json.loads(body)
        if event.get("id") != job_id:
            continue
        fields = dict(part.split("=", 1) for part in signature.decode().split(","))
        expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, fields["v1"]) and event["state"] == "done"
    return False


if __name__ == "__main__":
    if sys.argv[1] == "--verify":
        sys.exit(0 if verify(sys.argv[2], sys.argv[3], sys.stdin.buffer) else 1)
    serve(sys.argv[1])
