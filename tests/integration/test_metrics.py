"""GET /metrics: Prometheus text, summed over every API and worker process
sharing the metrics directory (the units' /run/imgworker/metrics; here the
pipeline's own), read with prometheus_client's parser as a scraper would."""

import os
import signal
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import samples


def scrape(base_url):
    response = requests.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def rise(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_counters_rise_by_exactly_the_uploads_and_jobs_summed_over_every_process(make_pipeline):
    pipeline = make_pipeline(api={"workers": "2"})       # two API processes as well
    pipeline.start_api()
    pipeline.start_worker(1)
    pipeline.start_worker(2)
    before = scrape(pipeline.base_url)
    ids = [pipeline.upload(samples.jpeg(1200, 900)).json()["id"] for _ in range(12)]
    assert pipeline.upload(data=b"not an image at all",
                           headers={"Content-Type": "image/jpeg"}).status_code == 415
    jobs = [pipeline.wait_job(job_id) for job_id in ids]
    assert {job["state"] for job in jobs} == {"done"}
    # both workers did some: the sum below is over two processes' files
    assert {pipeline.read_job(job_id).worker for job_id in ids} == {"1", "2"}

    after = scrape(pipeline.base_url)
    assert rise(before, after, "imgworker_uploads_total", status="202") == 12
    assert rise(before, after, "imgworker_uploads_total", status="415") == 1
    assert rise(before, after, "imgworker_upload_seconds_count") == 13
    assert rise(before, after, "imgworker_jobs_total", outcome="done") == 12
    assert rise(before, after, "imgworker_jobs_total", outcome="failed") == 0
    assert rise(before, after, "imgworker_render_seconds_count") == 12
    assert after[("imgworker_render_seconds_bucket", (("le", "+Inf"),))] >= 12
    assert after[("imgworker_broker_up", ())] == 1
    queue = (("queue", pipeline.queue),)
    assert after[("imgworker_queue_messages", queue)] == 0
    assert after[("imgworker_queue_consumers", queue)] == 2
    assert after[("imgworker_queue_messages", (("queue", pipeline.dead_letter_queue),))] == 0


def test_a_failed_job_and_a_retried_attempt_are_counted_by_outcome(make_pipeline):
    # a job slow enough (seconds) to kill its renderer in the middle
    pipeline = make_pipeline(renditions={"huge": "6000x6000 fit webp 100"})
    pipeline.start_api()
    worker = pipeline.start_worker()
    before = scrape(pipeline.base_url)
    bad = pipeline.upload(data=samples.truncated_jpeg(),
                          headers={"Content-Type": "image/jpeg"}).json()["id"]
    assert pipeline.wait_job(bad)["state"] == "failed"
    slow = pipeline.upload(samples.jpeg(5000, 3500, quality=90)).json()["id"]
    deadline = time.monotonic() + 30
    while pipeline.job(slow)["state"] != "processing" and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(worker.busy_renderer_pid(), signal.SIGKILL)     # a transient failure: retried
    job = pipeline.wait_job(slow, timeout=90)
    assert (job["state"], job["attempts"]) == ("done", 2)
    after = scrape(pipeline.base_url)
    assert rise(before, after, "imgworker_jobs_total", outcome="failed") == 1
    assert rise(before, after, "imgworker_jobs_total", outcome="retried") == 1
    assert rise(before, after, "imgworker_jobs_total", outcome="done") == 1


def test_nginx_answers_404_for_metrics_which_only_the_apis_own_address_serves(pipeline):
    pipeline.start_api()
    nginx = pipeline.start_nginx()
    assert requests.get(nginx.base_url + "/metrics", timeout=10).status_code == 404
    assert requests.get(pipeline.base_url + "/metrics", timeout=10).status_code == 200
