"""python3 -m bench.load URL PATH BODY CONTENT_TYPE CONNECTIONS SECONDS [--key K | --grants FILE]

A load generator for uploads that differ by their credentials: CONNECTIONS
keep-alive connections in one thread (selectors), each sending POST PATH
with the BODY file as raw bytes, one request at a time, for SECONDS. Each
request's head is made for it (its own grant, the next line of FILE, or the
key), the body is the same buffer every time: sendmsg() sends head and body
with no copy of the body in this process, so a grant per request costs the
client what a constant key does. (wrk formats such requests in Lua, which
makes a new 495 KB string for each: 1 ms of wrk's CPU per request more than
for a request equal to the one before.)

Prints what bench/ingest.py's wrk script prints:
RESULT requests duration_us connect read write status timeout p50 p90 p99 max
(latencies in microseconds; status: answers not 2xx; duration: from the
start to the last answer counted; requests answered after SECONDS are not
counted).
"""

import argparse
import selectors
import socket
import time
from urllib.parse import urlsplit


class Connection:
    def __init__(self, address):
        self.address = address
        self.sock = None
        self.reset()

    def reset(self):
        self.out = []            # memoryviews still to send
        self.received = b""
        self.started = None

    def connect(self):
        self.sock = socket.create_connection(self.address)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("path")
    parser.add_argument("body")
    parser.add_argument("content_type")
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--key", default="")
    parser.add_argument("--grants", default="")
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    address = (parts.hostname, parts.port or 80)
    with open(args.body, "rb") as handle:
        body = memoryview(handle.read())
    grants = open(args.grants) if args.grants else None
    common = (f"POST {args.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
              f"Content-Type: {args.content_type}\r\nContent-Length: {len(body)}\r\n")

    def head():
        if grants is not None:
            token = grants.readline().strip() or "imgwg_exhausted"
            return (common + f"Authorization: Bearer {token}\r\n\r\n").encode()
        if args.key:
            return (common + f"Authorization: Bearer {args.key}\r\n\r\n").encode()
        return (common + "\r\n").encode()

    selector = selectors.DefaultSelector()
    latencies, errors = [], {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    start = time.monotonic()
    deadline = start + args.seconds
    last = start

    def send_next(conn):
        conn.reset()
        conn.out = [memoryview(head()), body]
        conn.started = time.monotonic()
        selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def reopen(conn):
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        try:
            conn.connect()
        except OSError:
            errors["connect"] += 1
            return False
        selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        send_next(conn)
        return True

    connections = []
    for _ in range(args.connections):
        conn = Connection(address)
        conn.connect()
        selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        connections.append(conn)
        send_next(conn)
    active = len(connections)
    while active and time.monotonic() < deadline + 10:
        for key, mask in selector.select(timeout=0.5):
            conn = key.data
            if mask & selectors.EVENT_WRITE:
                try:
                    sent = conn.sock.sendmsg(conn.out)
                except BlockingIOError:
                    continue
                except OSError:
                    errors["write"] += 1
                    if not reopen(conn):
                        active -= 1
                    continue
                while sent and conn.out:
                    first = conn.out[0]
                    if sent >= len(first):
                        sent -= len(first)
                        conn.out.pop(0)
                    else:
                        conn.out[0] = first[sent:]
                        sent = 0
                if not conn.out:
                    selector.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            try:
                chunk = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                errors["read"] += 1
                if time.monotonic() >= deadline or not reopen(conn):
                    selector.unregister(conn.sock)
                    active -= 1
                continue
            conn.received += chunk
            head_end = conn.received.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            lines = conn.received[:head_end].decode("latin-1").split("\r\n")
            fields = {name.strip().lower(): value.strip() for name, _, value in
                      (line.partition(":") for line in lines[1:])}
            length = int(fields.get("content-length", 0))
            if len(conn.received) < head_end + 4 + length:
                continue
            now = time.monotonic()
            if now <= deadline:
                last = now
                latencies.append(now - conn.started)
                if not 200 <= int(lines[0].split()[1]) < 300:
                    errors["status"] += 1
            if now >= deadline:
                selector.unregister(conn.sock)
                conn.sock.close()
                active -= 1
            elif fields.get("connection", "").lower() == "close":
                if not reopen(conn):
                    active -= 1
            else:
                send_next(conn)
    for conn in connections:
        try:
            conn.sock.close()
        except OSError:
            pass
    errors["timeout"] += active
    latencies.sort()

    def percentile(p):
        return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1e6 \
            if latencies else 0
    print("RESULT %d %d %d %d %d %d %d %.0f %.0f %.0f %.0f" % (
        len(latencies), (last - start) * 1e6, errors["connect"], errors["read"], errors["write"],
        errors["status"], errors["timeout"], percentile(50), percentile(90), percentile(99),
        latencies[-1] * 1e6 if latencies else 0))


if __name__ == "__main__":
    main()
