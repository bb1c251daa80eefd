"""End to end, through the real pipeline (API, RabbitMQ, workers as the unit
runs them, setting their own malloc thresholds):

- drain: K jobs queued with no worker running, then N workers start; the
  rate is K over the time from the first job's start to the last one's
  finish (from the job files), against N x the engine rate of one process
  rendering the same job in this run, and against N engine processes run
  side by side (what the machine gives N renderers at once); with a core to
  spare, also against one engine process rendering on it during the drain
  (the same minutes: this host's speed moves by a third within seconds);
- latency: on an idle system, one 2 MP upload at a time through nginx, from
  the request to its job state reading `done` on disk.
"""

import os
import shutil
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from imgworker.job import State, record_path
from harness.pipeline import Pipeline

from . import engine, stats

def engine_rate(workdir, photo, repetitions):
    """Jobs per second of images.render with the default renditions, in a
    process of its own with imgworker's malloc thresholds, like a worker's
    renderer (one core), and the Sample of ms per job.

    The rate is the repetitions over their total time (1000 / the mean), as
    a drain's is its jobs over its duration: a drain pays for every job,
    the slow ones too. (1000 / the median, used before, runs 0-8% above
    that here, where one job in ten takes 40% longer than the median.)"""
    path = os.path.join(workdir, "engine-rate.jpg")
    with open(path, "wb") as handle:
        handle.write(photo)
    sample = engine.in_fresh_process(path, repetitions, renditions="default")
    return 1000 * len(sample.values) / sum(sample.values), sample


def engines_side_by_side(workdir, photo, repetitions, processes):
    """Jobs per second of ``processes`` engine processes (engine_rate's)
    rendering at once, summed: on a machine whose cores slow each other
    down (shared caches, hyperthreads, a busy host), less than N x one."""
    with ThreadPoolExecutor(processes) as pool:
        rates = list(pool.map(lambda _: engine_rate(workdir, photo, repetitions)[0],
                              range(processes)))
    return sum(rates)


class DrainRun(typing.NamedTuple):
    drained: float          # jobs/s
    engine: float           # one engine process's jobs/s, measured just before
    side_by_side: float     # N engine processes' jobs/s together, measured just before
    busy: float             # the renderers' share of the drain (drain's busy=)
    alongside: typing.Optional[float] = None    # one engine's jobs/s during the drain


def _fresh_pipeline(workdir, amqp_url, broker=None):
    run_dir = os.path.join(workdir, f"e2e-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    return Pipeline(amqp_url, run_dir, api={"workers": "2"}, broker=broker or {}), run_dir


def drain(workdir, amqp_url, photo, jobs, workers, broker=None, busy=None, alongside=None):
    """Jobs per second that ``workers`` workers drain from a full queue
    (``broker``: [broker] options, e.g. queue_type). ``busy``, a list: the
    share of the workers' time their renderers spent on jobs is appended
    (each record's render seconds, summed, over workers x the drain's
    duration), the drain loop's efficiency measured in the run itself.
    ``alongside``, a list: an engine process renders as many jobs as one
    worker does, started with the workers (on a spare core), and its rate
    is appended."""
    pipeline, run_dir = _fresh_pipeline(workdir, amqp_url, broker)
    try:
        pipeline.start_api()
        ids = [pipeline.upload(data=photo, headers={"Content-Type": "image/jpeg"}).json()["id"]
               for _ in range(jobs)]
        # All start at once (each waiting for its READY in turn would give
        # the first a head start alone)
        started = [pipeline.start_worker(instance, ready=False)
                   for instance in range(1, workers + 1)]
        for worker in started:
            worker.wait_notification("READY=1")
        engine_beside = None
        if alongside is not None:
            engine_beside = ThreadPoolExecutor(1)
            engine_run = engine_beside.submit(engine_rate, workdir, photo, jobs // workers)
        deadline = time.monotonic() + 60 + jobs * 2
        waiting = list(ids)          # checked oldest first, each until it is done
        while waiting and time.monotonic() < deadline:
            while waiting and getattr(pipeline.read_job(waiting[0]), "state", None) is State.DONE:
                waiting.pop(0)
            time.sleep(0.2)
        if waiting:
            raise RuntimeError(f"{workers} workers did not drain {jobs} jobs")
        if engine_beside is not None:
            alongside.append(engine_run.result()[0])
            engine_beside.shutdown()
        records = [pipeline.read_job(job_id) for job_id in ids]
        started = min(record.started_at for record in records)
        finished = max(os.stat(record_path(pipeline.root, job_id)).st_mtime for job_id in ids)
        if busy is not None:
            busy.append(sum(record.seconds for record in records) / (workers * (finished - started)))
        return jobs / (finished - started)
    finally:
        pipeline.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def latency(workdir, amqp_url, photo, uploads):
    """Milliseconds from each upload's request to its job reading done."""
    pipeline, run_dir = _fresh_pipeline(workdir, amqp_url)
    try:
        pipeline.start_api()
        pipeline.start_worker(1)
        nginx = pipeline.start_nginx()
        times = []
        for i in range(uploads + 2):                   # two warm-up uploads
            started = time.perf_counter()
            job_id = requests.post(nginx.base_url + "/upload", data=photo, timeout=30,
                                   headers={"Content-Type": "image/jpeg"}).json()["id"]
            while getattr(pipeline.read_job(job_id), "state", None) is not State.DONE:
                time.sleep(0.001)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - started))
            time.sleep(0.2)                            # idle between uploads
        return stats.Sample(times, "ms")
    finally:
        pipeline.close()
        shutil.rmtree(run_dir, ignore_errors=True)
