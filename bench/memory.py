"""Memory: peak resident set of a worker (its main process and its renderer
child, where the pixels are) for one job, each input on a fresh worker."""

import os
import shutil
import uuid

from harness.pipeline import Pipeline


def _peak_kb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def peak(workdir, amqp_url, photo, content_type):
    """(worker main MB, renderer MB) at their peaks over one job."""
    run_dir = os.path.join(workdir, f"memory-{uuid.uuid4().hex[:8]}")
    os.makedirs(run_dir)
    pipeline = Pipeline(amqp_url, run_dir)
    try:
        pipeline.start_api()
        worker = pipeline.start_worker()
        response = pipeline.upload(data=photo, headers={"Content-Type": content_type})
        response.raise_for_status()
        job = pipeline.wait_job(response.json()["id"], timeout=120)
        if job["state"] != "done":
            raise RuntimeError(f"the job {job['state']}: {job.get('error')}")
        pid = worker.process.pid
        return _peak_kb(pid) / 1024, _peak_kb(worker.renderer_pid()) / 1024
    finally:
        pipeline.close()
        shutil.rmtree(run_dir, ignore_errors=True)
