"""python3 -m bench.soak_receiver PORT_FILE LOG: the soak's webhook receiver.

The app's end of imgworker's webhooks, in a process of its own: a threading
HTTP server on 127.0.0.1 (a free port, written to PORT_FILE once it
listens) that answers every POST 200 and appends one line per request to
LOG:

    <unix time received> <Imgworker-Event> <job id> <state or ->

The soak reads LOG for upload-to-done latency (the time an app hears of a
job's end) and to check that every event was delivered.
"""

import http.server
import json
import os
import sys
import threading
import time


def main(argv=None):
    port_file, log_path = (argv or sys.argv[1:])[:2]
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            received = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                event = json.loads(body)
                job_id, state = event.get("id") or "-", event.get("state") or "-"
            except (ValueError, AttributeError):
                job_id, state = "-", "-"
            with lock:
                log.write(f"{received:.3f} {self.headers.get('Imgworker-Event', '-')} "
                          f"{job_id} {state}\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(port_file + ".new", "w") as handle:
        handle.write(str(server.server_address[1]))
    os.rename(port_file + ".new", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
