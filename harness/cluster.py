"""A RabbitMQ cluster of three nodes on this machine, for the cluster fault
scenarios (tests/faults/test_cluster_faults.py), the worker-only host test
(tests/system) and the bench.

RabbitMQ documents running several nodes on one host: each has its own node
name, AMQP and distribution ports and data directory, and they share epmd
and the ``rabbitmq`` user's Erlang cookie. Debian's ``rabbitmq-server``
wrapper drops to that user keeping the environment, so the nodes are started
through it, as root. They listen on 127.0.0.1 only and let ``guest`` in over
loopback. See ../shared/CLUSTER.md for the recipe this follows.

    python3 -m harness.cluster up|down [--dir DIR]   # by hand, for a look
"""

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time

#: Ports of node N: AMQP 5780+N, distribution 25780+N (beside a machine's
#: default node on 5672/25672).
AMQP_BASE, DIST_BASE = 5780, 25780

_RABBITMQCTL_TIMEOUT = 120


class NodeDown(Exception):
    pass


def wait_exited(pid, timeout=30):
    """Wait until process ``pid`` runs no more: gone, or a zombie its parent
    has yet to reap (a ``-detached`` node's parent is init). False if it
    still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


class Node:
    def __init__(self, number, directory):
        self.number = number
        self.name = f"imgworker-test{number}@localhost"
        self.port = AMQP_BASE + number
        self.dir = directory
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _environment(self):
        d = self.dir
        return {**os.environ,
                "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(DIST_BASE + self.number),
                "RABBITMQ_MNESIA_BASE": f"{d}/mnesia", "RABBITMQ_LOG_BASE": f"{d}/log",
                "RABBITMQ_PID_FILE": f"{d}/pid",
                "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
                "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq",
                # not /etc/rabbitmq/rabbitmq-env.conf, which may name another node
                "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf"}

    def prepare(self):
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        files = {"enabled_plugins": "[].\n", "rabbitmq-env.conf": "",
                 "rabbitmq.conf": f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                                  "loopback_users = none\n"
                                  # this machine's disk is shared by three nodes and
                                  # the tests' storage: the stock 50 MB
                                  "disk_free_limit.absolute = 50MB\n"}
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as handle:
                handle.write(text)

    def ctl(self, *args, check=True, timeout=_RABBITMQCTL_TIMEOUT):
        result = subprocess.run(["rabbitmqctl", "-n", self.name, *args], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise NodeDown(f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                           f"{(result.stderr or result.stdout).strip()}")
        return result

    def start(self, timeout=120):
        """Start the node (its own session: a test's Ctrl-C must not reach
        it) and wait until it runs its applications."""
        log = open(os.path.join(self.dir, "log", "console.log"), "ab")
        subprocess.Popen(["rabbitmq-server"], env=self._environment(), stdout=log,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
        log.close()
        self.await_startup(timeout)

    def await_startup(self, timeout=120):
        # await_startup fails at once (69) until the node has registered
        # with epmd: retry until the deadline.
        deadline = time.monotonic() + timeout
        while self.ctl("-q", "await_startup", "--timeout", "30", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise NodeDown(f"{self.name} did not start in {timeout} s; see {self.dir}/log")
            time.sleep(0.5)

    def stop(self):
        """A clean shutdown (``rabbitmqctl stop``: what systemctl stop does)."""
        self.ctl("stop")

    def os_pid(self):
        return int(self.ctl("-q", "eval", "list_to_integer(os:getpid()).").stdout.strip())

    def kill(self):
        """SIGKILL exactly this node's beam.smp (never a broad pkill: other
        RabbitMQ nodes may run on the machine)."""
        pid = self.os_pid()
        os.kill(pid, signal.SIGKILL)
        wait_exited(pid)

    def is_running(self):
        return self.ctl("-q", "status", check=False, timeout=30).returncode == 0


class Cluster:
    """Three nodes joined into one cluster. ``urls`` is the [broker] url
    value that names all of them."""

    def __init__(self, directory, size=3):
        self.dir = directory
        self.nodes = [Node(n, os.path.join(directory, f"n{n}")) for n in range(1, size + 1)]

    @property
    def urls(self):
        return ",".join(node.url for node in self.nodes)

    def node(self, name):
        return next(node for node in self.nodes if node.name == name)

    def start(self):
        if shutil.which("rabbitmq-server") is None:
            raise NodeDown("rabbitmq-server is not installed (script/bootstrap installs it)")
        for node in self.nodes:
            node.prepare()
        rabbitmq = pwd.getpwnam("rabbitmq")
        for path, _dirs, files in os.walk(self.dir):
            for name in [path, *(os.path.join(path, f) for f in files)]:
                os.chown(name, rabbitmq.pw_uid, rabbitmq.pw_gid)
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = self.running_nodes()
        if sorted(running) != sorted(node.name for node in self.nodes):
            raise NodeDown(f"the cluster runs {running}")

    def running_nodes(self, via=None):
        """Names of the nodes the cluster sees running (asked of ``via``)."""
        via = via or next(node for node in self.nodes if node.is_running())
        out = via.ctl("-q", "eval", "rabbit_nodes:all_running().").stdout
        return [name.strip(" \n[]'") for name in out.split(",") if name.strip(" \n[]")]

    def leader(self, queue, vhost="/"):
        """The node that leads a quorum queue now."""
        for node in self.nodes:
            if not node.is_running():
                continue
            out = node.ctl("-q", "list_queues", "-p", vhost, "name", "leader", check=False)
            for line in out.stdout.splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[0] == queue:
                    return self.node(fields[1])
        raise NodeDown(f"no running node knows a leader for {queue}")

    def wait_until_safe_to_stop(self, node, timeout=120):
        """What an operator runs before taking a node down in a rolling
        restart: wait until no quorum queue would lose its majority with it."""
        deadline = time.monotonic() + timeout
        while subprocess.run(["rabbitmq-queues", "-n", node.name, "-q",
                              "check_if_node_is_quorum_critical"], capture_output=True,
                             timeout=_RABBITMQCTL_TIMEOUT).returncode != 0:
            if time.monotonic() > deadline:
                raise NodeDown(f"{node.name} stayed quorum-critical for {timeout} s")
            time.sleep(0.5)

    def stop(self):
        """Stop every node that still runs; kill what does not stop."""
        for node in self.nodes:
            try:
                if node.is_running():
                    node.stop()
            except (NodeDown, subprocess.TimeoutExpired):
                try:
                    node.kill()
                except (NodeDown, subprocess.TimeoutExpired, ProcessLookupError):
                    pass


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m harness.cluster")
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--dir", default="/var/tmp/imgworker-cluster")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir)
    if args.command == "down":
        cluster.stop()
        return 0
    shutil.rmtree(args.dir, ignore_errors=True)
    cluster.start()
    print(f"[broker]\nurl = {cluster.urls}\nqueue_type = quorum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
