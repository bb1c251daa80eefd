"""The harness, which runs the real thing: a real RabbitMQ, the api and workers
as separate processes started the way systemd starts them (a config file in
IMGWORKER_CONFIG, a NOTIFY_SOCKET the harness binds and reads), and nginx with
the shipped site. The tests (through tests/conftest.py's fixtures) and the
benchmarks (bench/) both drive the pipeline through it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pika
import requests

from imgworker import allocator, config
from imgworker import job as jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMQP_URL = os.environ.get("IMGWORKER_TEST_AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid):
    """The child processes of ``pid``, from every one of its threads."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except FileNotFoundError:
        pass
    return found


def wait_for_port(port, process, what, timeout=20):
    """Return once something accepts connections on 127.0.0.1:port; fail if
    ``process`` exits first or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start listening on {port}") from None
            time.sleep(0.05)


def wait_until(condition, what, timeout=30, interval=0.1):
    """Poll ``condition()`` until it answers something true, and return that;
    fail naming ``what`` was awaited once ``timeout`` seconds have passed.
    A test waits for the event itself, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}, in vain")
        time.sleep(interval)


def unit_environment(path):
    """{name: value} of a unit file's Environment= lines (unquoted values,
    as imgworker's units write them)."""
    found = {}
    with open(path) as handle:
        for line in handle:
            if line.startswith("Environment="):
                for assignment in line[len("Environment="):].split():
                    name, _, value = assignment.partition("=")
                    found[name] = value
    return found


class Service:
    """One imgworker process with its own sd_notify socket."""

    def __init__(self, name, args, env, workdir, source=REPO):
        self.name = name
        # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path named
        # after a long test name can exceed that.
        self.notify_path = os.path.join(tempfile.mkdtemp(prefix="iw-"), "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notifications = []
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imgworker", *args], cwd=source, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": self.notify_path, **env})

    def read_notifications(self, timeout):
        """Collect datagrams for up to timeout seconds; returns the new ones."""
        new = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.notify.settimeout(remaining)
            try:
                new.append(self.notify.recv(4096).decode())
            except socket.timeout:
                break
        self.notifications += new
        return new

    def wait_notification(self, text, timeout=20):
        """The first notification containing text; waits up to timeout
        seconds, reading what a process sent even after it exited."""
        deadline = time.monotonic() + timeout
        while True:
            for seen in self.notifications:
                if text in seen:
                    return seen
            exited = self.process.poll() is not None
            if not self.read_notifications(0.2) and (exited or time.monotonic() > deadline):
                break
        raise AssertionError(f"{self.name} sent no {text!r} in {timeout} s (exit status "
                             f"{self.process.returncode}); got {self.notifications}\n{self.log()}")

    def wait_log(self, text, timeout=20):
        """Wait until the process has logged ``text``; fail naming it, with
        the log so far, after ``timeout`` seconds."""
        try:
            wait_until(lambda: text in self.log(), f"{self.name} to log {text!r}", timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log()}") from None

    def log(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def signal(self, signum):
        self.process.send_signal(signum)

    def kill_tree(self):
        """SIGKILL the process and every descendant at once (a gunicorn
        arbiter and its workers), as a crash or the OOM killer would."""
        pids, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            pids.append(pid)
            pending += children(pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def renderer_pid(self, timeout=10):
        """A worker's rendering child (spawned: its command line says so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in children(self.process.pid):
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as handle:
                        if b"spawn_main" in handle.read():
                            return child
                except FileNotFoundError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} has no renderer process")

    def busy_renderer_pid(self, timeout=30):
        """The renderer child once it is at work (it has used CPU since it
        was found). A job's record says processing before its render is
        handed to the child: a child killed before then is idle, and the
        worker starts another for the job without a failed attempt."""
        pid = self.renderer_pid()

        def cpu_ticks():
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])     # utime + stime
        start = cpu_ticks()
        wait_until(lambda: cpu_ticks() >= start + 10, f"{self.name}'s renderer {pid} to render",
                   timeout, interval=0.02)
        return pid

    def stop(self, timeout=30):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Nginx:
    """nginx running the shipped site in front of a pipeline's API. Only its
    addresses, the storage path and (unless ``rate_limits="shipped"``) the
    rates are changed, so the limits and timeouts under test are the ones
    the package installs.

    ``rate_limits="lifted"`` multiplies every rate and burst by 1000: tests
    that upload fast from one address test something else. ``tls=True``
    runs the HTTPS site (imgworker-tls.conf) with a self-signed certificate
    for 127.0.0.1 (``self.certificate``): ``base_url`` is https, and
    ``http_url`` the plain server that redirects. ``erasure_wait`` (e.g.
    "1s") shortens how long nginx waits for an owner's erasure.
    """

    def __init__(self, pipeline, worker_processes=1, rate_limits="lifted", tls=False,
                 erasure_wait=None):
        assert rate_limits in ("lifted", "shipped")
        self.dir = tempfile.mkdtemp(prefix="iw-nginx-")
        self.port = free_port()
        self.base_url = self.http_url = f"http://127.0.0.1:{self.port}"
        shipped_dir = os.path.join(pipeline.source, "nginx")

        def read(*path):
            with open(os.path.join(shipped_dir, *path)) as handle:
                return handle.read()

        def edit(text, name, changes):
            for shipped, here in changes.items():
                assert shipped in text, f"nginx/{name} no longer says {shipped!r}"
                text = text.replace(shipped, here)
            return text

        upstream = {"server 127.0.0.1:8000 ": f"server 127.0.0.1:{pipeline.port} "}
        self.access_log = os.path.join(self.dir, "access.log")
        alias = {"alias /var/lib/imgworker/renditions/;":
                 f"alias {os.path.join(pipeline.root, 'renditions')}/;"}
        if erasure_wait is not None:
            alias["proxy_read_timeout 300s;"] = f"proxy_read_timeout {erasure_wait};"
        if os.path.exists(os.path.join(shipped_dir, "conf.d")):
            alias["access_log /var/log/nginx/access.log imgworker;"] = \
                f"access_log {self.access_log} imgworker;"
        if not os.path.exists(os.path.join(shipped_dir, "snippets")):
            # a tree from before the TLS site: one file, the site
            assert not tls, "this tree has no HTTPS site"
            site = edit(read("imgworker.conf"), "imgworker.conf", {
                "listen 80 default_server;": f"listen 127.0.0.1:{self.port};",
                "listen [::]:80 default_server;": "", **upstream, **alias})
        else:
            snippet = os.path.join(self.dir, "locations.conf")
            with open(snippet, "w") as handle:
                handle.write(edit(read("snippets", "imgworker-locations.conf"),
                                  "snippets/imgworker-locations.conf", alias))
            http = edit(read("conf.d", "imgworker.conf"), "conf.d/imgworker.conf", upstream)
            if rate_limits == "lifted":
                http = re.sub(r"\brate=(\d+)r/s", r"rate=\g<1>000r/s", http)
                with open(snippet) as handle:
                    lifted = re.sub(r"\bburst=(\d+)", r"burst=\g<1>000", handle.read())
                with open(snippet, "w") as handle:
                    handle.write(lifted)
            include = {"include /etc/nginx/snippets/imgworker-locations.conf;":
                       f"include {snippet};"}
            if tls:
                self.tls_port = free_port()
                self.base_url = f"https://127.0.0.1:{self.tls_port}"
                self.certificate = os.path.join(self.dir, "cert.pem")
                key = os.path.join(self.dir, "key.pem")
                subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                                "-days", "1", "-subj", "/CN=127.0.0.1",
                                "-addext", "subjectAltName=IP:127.0.0.1",
                                "-keyout", key, "-out", self.certificate],
                               check=True, capture_output=True)
                site = edit(read("sites-available", "imgworker-tls.conf"), "imgworker-tls.conf", {
                    "listen 443 ssl default_server;": f"listen 127.0.0.1:{self.tls_port} ssl;",
                    "listen [::]:443 ssl default_server;": "",
                    "listen 80 default_server;": f"listen 127.0.0.1:{self.port};",
                    "listen [::]:80 default_server;": "",
                    "/etc/letsencrypt/live/images.example.org/fullchain.pem": self.certificate,
                    "/etc/letsencrypt/live/images.example.org/privkey.pem": key,
                    **include})
            else:
                site = edit(read("sites-available", "imgworker.conf"), "imgworker.conf", {
                    "listen 80 default_server;": f"listen 127.0.0.1:{self.port};",
                    "listen [::]:80 default_server;": "", **include})
            site = http + "\n" + site
        with open(os.path.join(self.dir, "site.conf"), "w") as handle:
            handle.write(site)
        # As root, nginx's workers would run as nobody, who cannot read a
        # test's private storage root.
        user = "user root root;" if os.geteuid() == 0 else ""
        with open(os.path.join(self.dir, "nginx.conf"), "w") as handle:
            handle.write(f"""
daemon off; {user}
worker_processes {worker_processes};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    access_log {self.access_log};
    client_body_temp_path {self.dir}/body;
    proxy_temp_path {self.dir}/proxy;
    include {self.dir}/site.conf;
}}
""")
        self.process = subprocess.Popen(
            ["nginx", "-p", self.dir, "-e", os.path.join(self.dir, "error.log"),
             "-c", os.path.join(self.dir, "nginx.conf")], stdout=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.process, "nginx", timeout=10)
        except AssertionError as error:
            raise AssertionError(f"{error}:\n{self.error_log()}") from None

    def error_log(self):
        with open(os.path.join(self.dir, "error.log"), errors="replace") as handle:
            return handle.read()

    def statuses(self, at_least=0, timeout=10):
        """The status of every request in the access log, in order. nginx
        logs a request when it is finished with the connection (after a
        lingering close, say): wait for ``at_least`` lines."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.access_log) as handle:
                found = [int(line.split('"')[2].split()[0]) for line in handle]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _knows_option(source, option):
    """Whether the imgworker tree at ``source`` has ``option`` in its
    config schema (the bench runs older trees beside this one)."""
    with open(os.path.join(source, "imgworker", "config.py"), encoding="utf-8") as handle:
        return f'"{option}": Option(' in handle.read()


class Pipeline:
    """A config file, a storage root and queues of its own, and helpers to
    start services and look at what a user would look at."""

    def __init__(self, amqp_url, workdir, source=REPO, **sections):
        """``source``: the imgworker tree whose API, workers and nginx site
        run (the bench runs an older one beside this one)."""
        self.source = source
        self.workdir = str(workdir)
        self.root = os.path.join(self.workdir, "storage")
        tag = uuid.uuid4().hex[:8]
        self.queue = f"imgworker-test-{tag}.jobs"
        self.dead_letter_queue = f"imgworker-test-{tag}.dead"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        values = {
            "broker": {"url": amqp_url, "queue": self.queue,
                       "dead_letter_queue": self.dead_letter_queue, "timeout": "2"},
            "storage": {"root": self.root},
            "api": {"listen": f"127.0.0.1:{self.port}", "workers": "1", "retry_after": "4"},
            "worker": {"retry_delay": "0.5"},
        }
        # shared by this pipeline's API and workers, as the host's
        # /run/imgworker/metrics is (imgworker/metrics.py); a tree older than
        # [storage] metrics_dir is told in its units' variable (start())
        self.metrics_dir = os.path.join(self.workdir, "metrics")
        os.makedirs(self.metrics_dir, exist_ok=True)      # an older tree does not make it
        if source == REPO or _knows_option(source, "metrics_dir"):
            # Never the default /run/imgworker/metrics: another pipeline, or
            # another prometheus_client (the PyPI pass), may have files there.
            values["storage"]["metrics_dir"] = self.metrics_dir
        if source == REPO:
            # Open, as an upgraded install is: the tests of credentials
            # say auth={"required": "true"}. The keys and grant secrets are
            # this pipeline's (add_key).
            values["auth"] = {"required": "false",
                              "keys_file": os.path.join(self.workdir, "keys.json"),
                              "grant_secrets_file": os.path.join(self.workdir,
                                                                 "grant-secrets.json")}
        for section, options in sections.items():
            values.setdefault(section, {}).update(options)
        self.values = values
        self.root = values["storage"]["root"]
        self.config_path = os.path.join(self.workdir, "config.ini")
        with open(self.config_path, "w") as handle:
            for section, options in values.items():
                handle.write(f"[{section}]\n")
                handle.writelines(f"{key} = {value}\n" for key, value in options.items())
        self.amqp_url = amqp_url
        self.services = []
        self.nginx = None

    def start(self, name, *args, env=None, ready=True):
        environment = {"IMGWORKER_CONFIG": self.config_path}
        if self.source != REPO:
            environment["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        service = Service(name, args, {**environment, **(env or {})}, self.workdir, self.source)
        self.services.append(service)
        if ready:
            service.wait_notification("READY=1")
        return service

    def api_environment(self):
        """The malloc environment of this tree's API processes, for a
        stand-in that does not start the way the API does (the bench's
        ceiling): this tree's API sets its thresholds itself
        (imgworker/allocator.py); an older tree's unit set them."""
        if self.source == REPO:
            return allocator.environment("api")
        shipped = unit_environment(os.path.join(self.source, "systemd", "imgworker-api.service"))
        shipped.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return shipped

    def start_api(self, env=None, **kwargs):
        """The API as its tree starts it: this tree's with no environment
        but the config (it sets itself up, whoever starts it), an older
        tree's with its unit's environment."""
        unit = {} if self.source == REPO else self.api_environment()
        return self.start("api", "api", env={**unit, **(env or {})}, **kwargs)

    def cli(self, *args, check=True):
        """``imgworker ARGS`` of this tree with this pipeline's config, as
        an operator runs it."""
        return subprocess.run([sys.executable, "-m", "imgworker", *args], cwd=self.source,
                              env={**os.environ, "IMGWORKER_CONFIG": self.config_path,
                                   "PYTHONPATH": self.source},
                              capture_output=True, text=True, check=check, timeout=60)

    def add_key(self, name, scopes="upload"):
        """A new API key (``imgworker keys add``): its secret."""
        return self.cli("keys", "add", name, "--scope", scopes).stdout.strip()

    def revoke_key(self, name):
        self.cli("keys", "revoke", name)

    def start_nginx(self, **kwargs):
        self.nginx = Nginx(self, **kwargs)
        return self.nginx

    def start_worker(self, instance=1, **kwargs):
        return self.start(f"worker{instance}-{len(self.services)}", "worker",
                          "--instance", str(instance), **kwargs)

    # -- what a user sees -------------------------------------------------------
    def upload(self, image=None, **kwargs):
        if "files" not in kwargs and image is not None:
            kwargs["files"] = {"file": ("photo.jpg", image, "image/jpeg")}
        return requests.post(self.base_url + "/upload", timeout=30, **kwargs)

    def job(self, job_id):
        return requests.get(f"{self.base_url}/jobs/{job_id}", timeout=10).json()

    def wait_job(self, job_id, states=("done", "failed"), timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("state") in states:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not {states} after {timeout} s: {self.job(job_id)}\n"
                             + "\n".join(s.log() for s in self.services))

    def read_job(self, job_id):
        """The job's record (a job.Job) straight from disk (works with the API down)."""
        return jobs.read(self.root, job_id)

    @property
    def renditions(self):
        return config.load(self.config_path).renditions

    def stored_jobs(self):
        jobs = os.path.join(self.root, "jobs")
        return sorted(os.listdir(jobs)) if os.path.isdir(jobs) else []

    def stored_originals(self):
        originals = os.path.join(self.root, "originals")
        return sorted(os.listdir(originals)) if os.path.isdir(originals) else []

    def _channel(self):
        # one node of a cluster's comma-separated URLs that answers
        connection = pika.BlockingConnection(
            [pika.URLParameters(url) for url in config.split_urls(self.amqp_url)])
        return connection, connection.channel()

    def _queue_state(self, queue):
        connection, channel = self._channel()
        try:
            return channel.queue_declare(queue or self.queue, passive=True).method
        finally:
            connection.close()

    def queue_depth(self, queue=None):
        """Messages ready in the queue, as rabbitmqctl list_queues shows them."""
        return self._queue_state(queue).message_count

    def consumers(self, queue=None):
        """Consumers the broker counts on the queue (the workers that are
        back after a broker node went away)."""
        return self._queue_state(queue).consumer_count

    def dead_lettered(self):
        """(body, x-death reason) of every message in the dead-letter queue,
        left in place."""
        connection, channel = self._channel()
        found = []
        try:
            while True:
                method, properties, body = channel.basic_get(self.dead_letter_queue)
                if method is None:
                    break
                deaths = (properties.headers or {}).get("x-death")
                death = deaths[0] if isinstance(deaths, list) and deaths else {}
                found.append((body, death.get("reason") if isinstance(death, dict) else None))
        finally:
            connection.close()  # unacked gets go back to the queue
        return found

    def dead_letters(self):
        """(job id, x-death reason) of every job in the dead-letter queue."""
        return [(json.loads(body)["id"], reason) for body, reason in self.dead_lettered()]

    def publish_raw(self, body):
        """Put any bytes on the job queue, as a buggy or hostile producer would."""
        connection, channel = self._channel()
        try:
            channel.confirm_delivery()
            channel.basic_publish("", self.queue, body, pika.BasicProperties(delivery_mode=2))
        finally:
            connection.close()

    def close(self):
        if self.nginx is not None:
            self.nginx.stop()
        for service in self.services:
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait()
            service.notify.close()
        try:
            connection, channel = self._channel()
            channel.queue_delete(self.queue)
            channel.queue_delete(self.dead_letter_queue)
            connection.close()
        except pika.exceptions.AMQPError:
            pass
