"""An API process starts every thread of its pool before it takes its first
request (server.py), so its threads -- and the memory each keeps for bodies
(allocator.py) -- do not grow in steps when concurrency first reaches a new
level hours in, as the soak's hour of 2026-12-02 saw."""

from concurrent.futures import ThreadPoolExecutor

from harness import samples
from harness.pipeline import children


def threads_of(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def test_an_api_process_has_all_its_threads_before_its_first_upload(make_pipeline):
    # Given an API process with a pool of 6 threads, that has answered one upload
    pipeline = make_pipeline(api={"threads": "6"})
    api = pipeline.start_api()
    (process,) = children(api.process.pid)          # [api] workers = 1 in the harness
    assert pipeline.upload(samples.jpeg(64, 64)).status_code == 202
    at_start = threads_of(process)
    assert at_start >= 6 + 1                        # the pool's threads and the main one
    # When 24 clients upload at once, more than its pool can take together
    image = samples.jpeg(1600, 1200)
    with ThreadPoolExecutor(24) as clients:
        statuses = list(clients.map(lambda _: pipeline.upload(image).status_code, range(48)))
    # Then all were accepted and the process has the threads it started with
    assert statuses == [202] * 48
    assert threads_of(process) == at_start
