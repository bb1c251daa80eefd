"""The soak's sampler: every imgworker process by kind, beam.smp, the queue,
the metrics directory, the storage, latency and Prometheus's alerts, at one
moment. Reads /proc and files only, plus one passive queue declaration and
one GET of Prometheus's alerts: it costs the system under test little.

Process kinds:

- "API master": the gunicorn arbiter (the API service's process);
- "API worker": its children;
- "worker": each worker service's process;
- "renderer": a worker's rendering child (its command line says
  spawn_main); a renderer killed is replaced, and the new pid is a new
  series;
- "worker helper": any other child of a worker (multiprocessing's
  resource tracker, if one runs);
- "webhook sender";
- "beam.smp": RabbitMQ's Erlang VM.
"""

import json
import os
import time

from harness.pipeline import children

KINDS = ("API master", "API worker", "worker", "renderer", "worker helper", "webhook sender",
         "beam.smp")


def proc(pid, sockets_here):
    """(RSS bytes, open fds, of which sockets, threads, the sockets by kind
    (socket_kinds)) of ``pid``, or None once it is gone. ``sockets_here``:
    socket_table() of this moment."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            status = dict(line.split(":", 1) for line in handle if ":" in line)
        fds = os.listdir(f"/proc/{pid}/fd")
        inodes = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.append(int(target[len("socket:["):-1]))
        return (int(status["VmRSS"].split()[0]) * 1024, len(fds), len(inodes),
                int(status["Threads"]), socket_kinds(inodes, sockets_here))
    except (OSError, KeyError, ValueError):
        return None


#: /proc/net/tcp's state of a listening socket.
_LISTEN = "0A"


def socket_table():
    """{inode: ("tcp", local port, remote port, listening) or ("unix",)}
    of this network namespace's TCP and Unix sockets, now: one read of
    /proc/net/{tcp,tcp6,unix} a sample, shared by every process."""
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    inode = int(fields[9])
                    if inode:
                        local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                        table[inode] = ("tcp", local, remote, fields[3] == _LISTEN)
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    try:
        with open("/proc/net/unix") as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if len(fields) >= 7:
                    table[int(fields[6])] = ("unix",)
    except (OSError, StopIteration, ValueError):
        pass
    return table


def socket_kinds(inodes, table):
    """A process's sockets counted by kind: "listening", "accepted" (a
    connection to one of its own listening ports: a client's, nginx's
    keep-alive ones among them), "pair" (both ends of a loopback connection
    are its own: pika's I/O loop wakes itself through one), "to port N" (a
    connection it made: 5672 is the broker), "unix" and "other" (netlink,
    UDP, or one gone between the two reads)."""
    entries = [table.get(inode) for inode in inodes]
    tcp = [entry for entry in entries if entry and entry[0] == "tcp"]
    listening = {entry[1] for entry in tcp if entry[3]}
    ends = {(entry[1], entry[2]) for entry in tcp if not entry[3]}
    kinds = {}
    for entry in entries:
        if entry is None:
            kind = "other"
        elif entry[0] == "unix":
            kind = "unix"
        elif entry[3]:
            kind = "listening"
        elif (entry[2], entry[1]) in ends:
            kind = "pair"
        elif entry[1] in listening:
            kind = "accepted"
        else:
            kind = f"to port {entry[2]}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def rabbitmq_pids():
    """The broker's Erlang VM: the node rabbitmqctl answers for (the one the
    soak uses; a cluster test may run others on this machine), else every
    RabbitMQ node's."""
    import subprocess
    try:
        answer = subprocess.run(["rabbitmqctl", "-q", "eval", "os:getpid()."],
                                capture_output=True, text=True, timeout=60).stdout
        pid = int(answer.strip().strip('"'))
        if os.path.exists(f"/proc/{pid}"):
            return [pid]
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    from .auth import _rabbitmq_pids
    return _rabbitmq_pids()


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def tree_size(root):
    """(bytes, files and directories) below ``root``, by du (in C, and off
    this process's GIL: the renderer killer's thread shares it). Slow on a
    big tree: 0.7 s at 35,000 files."""
    import subprocess
    found = []
    for option in ("--bytes", "--inodes"):
        try:
            answer = subprocess.run(["du", "-s", option, root], capture_output=True, text=True,
                                    timeout=120).stdout
            found.append(int(answer.split()[0]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            found.append(None)
    return tuple(found)


def filesystem_used(path):
    """(bytes, inodes) in use on the filesystem of ``path``: one statvfs."""
    disk = os.statvfs(path)
    return (disk.f_blocks - disk.f_bfree) * disk.f_frsize, disk.f_files - disk.f_ffree


class StorageSize:
    """The storage's size in bytes and in files and directories. On a
    filesystem of its own (bench/erasure.py's filesystem()): what that
    filesystem has in use beyond what it had empty, by statvfs, which costs
    nothing however many files an hour writes. Otherwise du of the tree."""

    def __init__(self, mount=None):
        """Made before anything is written to ``mount``."""
        self.mount = mount
        self.empty = filesystem_used(mount) if mount and os.path.ismount(mount) else None

    def __call__(self, root):
        if self.empty is None:
            return tree_size(root)
        used = filesystem_used(self.mount)
        return used[0] - self.empty[0], used[1] - self.empty[1]


class _Tail:
    """New complete lines of a growing file."""

    def __init__(self, path):
        self.path, self.position = path, 0

    def lines(self):
        if not os.path.exists(self.path):
            return []
        found = []
        with open(self.path, "rb") as handle:
            handle.seek(self.position)
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                self.position += len(line)
                found.append(line.decode())
        return found


_HZ = os.sysconf("SC_CLK_TCK")


def _ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid):
    found, pending = [], [pid]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children(pid)
    return found


def _machine_busy():
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return sum(values) - values[3] - values[4]      # less idle and iowait


class Sampler:
    def __init__(self, soak):
        self.soak = soak
        self.samples = []
        self._cpu_at = None         # (time, machine busy ticks, {pid: ticks})
        self.rabbit = rabbitmq_pids()
        self._uploads = _Tail(os.path.join(soak.load_dir, "uploads.jsonl"))
        self._events = _Tail(soak.receiver_log)
        self.uploaded = {}        # job id -> (t0, phase, input)
        self.done = {}            # job id -> seconds from upload to its job.done
        self.done_at = {}         # job id -> when its job.done came
        self._seen = {}           # job id -> {event: count}

    def processes(self):
        soak = self.soak
        found = [("API master", soak.api.process.pid)]
        found += [("API worker", pid) for pid in children(soak.api.process.pid)]
        for worker in soak.workers.values():
            if worker.process.poll() is not None:
                continue
            found.append(("worker", worker.process.pid))
            for child in children(worker.process.pid):
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as handle:
                        spawned = b"spawn_main" in handle.read()
                except OSError:
                    continue
                found.append(("renderer" if spawned else "worker helper", child))
        found.append(("webhook sender", soak.webhook.process.pid))
        found += [("beam.smp", pid) for pid in self.rabbit]
        return found

    def _read_events(self):
        for line in self._uploads.lines():
            entry = json.loads(line)
            if entry["id"]:
                self.uploaded[entry["id"]] = (entry["t0"], entry["phase"], entry["input"])
        new = []
        for line in self._events.lines():
            received, event, job_id, _state = line.split()
            self._seen.setdefault(job_id, {})
            self._seen[job_id][event] = self._seen[job_id].get(event, 0) + 1
            if event == "job.done" and job_id in self.uploaded and job_id not in self.done:
                self.done[job_id] = float(received) - self.uploaded[job_id][0]
                self.done_at[job_id] = float(received)
                new.append(self.done[job_id])
        return new

    def events(self):
        self._read_events()
        return self._seen

    def events_missing(self, ids):
        """Whether some job in ``ids`` that ended has no event yet."""
        self._read_events()
        from imgworker import job as jobs
        for job_id in ids:
            job = jobs.read(self.soak.pipeline.root, job_id)
            if job is not None and job.state.finished and \
                    f"job.{job.state.value}" not in self._seen.get(job_id, {}):
                return True
        return False

    def cpu(self):
        """Cores busy since the last call: the machine's, and the soak's own
        (this process and every descendant -- the API, workers, renderers,
        webhook sender, nginx, Prometheus, the load generator, the receiver
        -- and beam.smp). The rest is other work on the machine."""
        now, busy = time.time(), _machine_busy()
        pids = _descendants(os.getpid()) + self.rabbit
        ticks = {pid: value for pid, value in ((pid, _ticks(pid)) for pid in pids)
                 if value is not None}
        found = None
        if self._cpu_at is not None:
            then, busy_then, ticks_then = self._cpu_at
            ours = sum(value - ticks_then.get(pid, 0) for pid, value in ticks.items()
                       if value >= ticks_then.get(pid, 0))
            span = (now - then) * _HZ
            if span > 0:
                found = {"machine": (busy - busy_then) / span, "ours": ours / span}
        self._cpu_at = (now, busy, ticks)
        return found

    def sample(self, phase):
        soak = self.soak
        now = time.time()
        procs = []
        sockets_here = socket_table()
        for kind, pid in self.processes():
            measured = proc(pid, sockets_here)
            if measured is not None:
                rss, fds, sockets, threads, by_kind = measured
                procs.append({"kind": kind, "pid": pid, "rss": rss, "fds": fds,
                              "sockets": sockets, "socket_kinds": by_kind,
                              "threads": threads})
        latencies = self._read_events()
        try:
            metrics_files = len(os.listdir(soak.pipeline.metrics_dir))
        except OSError:
            metrics_files = None
        storage_bytes, storage_files = soak.storage_size(soak.pipeline.root)
        log_bytes = 0
        for service in soak.pipeline.services:
            try:
                log_bytes += os.path.getsize(service.log_path)
            except OSError:
                pass
        sample = {
            "t": now, "phase": phase, "procs": procs, "queue": soak.queue_depth(),
            "metrics_files": metrics_files, "storage_bytes": storage_bytes,
            "storage_files": storage_files, "log_bytes": log_bytes,
            "latency": {"n": len(latencies), "p50": percentile(latencies, 50),
                        "p99": percentile(latencies, 99)},
            "alerts": soak.prometheus.alerts(), "cpu": self.cpu(),
            "cost": time.time() - now,
        }
        self.samples.append(sample)
        return sample
