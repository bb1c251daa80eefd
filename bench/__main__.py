"""python3 -m bench [--smoke] [--out DIR] [--only engine,ingest,endtoend,memory,queues,fuzz,auth,erasure]
   python3 -m bench [--smoke] [--out DIR] --only soak [--minutes N]

Runs the benchmarks (see bench/__init__.py) and writes DIR/results.md and
DIR/chart.png (default DIR: bench/results). Needs RabbitMQ on localhost (or
IMGWORKER_TEST_AMQP_URL), nginx and wrk; script/bench installs and starts
them, and pyvips for the engine baseline. The soak (``--only soak``, not
run by default: it takes ``--minutes``, an hour unless told) writes
DIR/soak/results.md and its chart, and nothing else.
"""

import argparse
import os
import sys
import tempfile

from imgworker import config
from harness.pipeline import AMQP_URL

from . import auth, endtoend, engine, erasure, fuzz, ingest, inputs, memory, queues, report

PARTS = ("engine", "ingest", "endtoend", "memory", "queues", "fuzz", "auth", "erasure")
#: Run only when asked for by name (--only): they take too long for the default run.
ON_REQUEST = ("soak",)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny inputs, one repetition: checks the code runs, measures nothing")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts, of {', '.join(PARTS + ON_REQUEST)} "
                             f"(default: all but {', '.join(ON_REQUEST)})")
    parser.add_argument("--minutes", type=int, default=60,
                        help="how long the soak runs (--only soak), in minutes")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    unknown = set(parts) - set(PARTS + ON_REQUEST)
    if unknown:
        parser.error(f"no such part: {', '.join(sorted(unknown))}")
    smoke = args.smoke
    reps = 1 if smoke else 7
    os.makedirs(args.out, exist_ok=True)
    log = print
    if "soak" in parts:
        from . import soak         # only now: the soak may not be installed with the rest
        soak.run(minutes=args.minutes, smoke=smoke, out=os.path.join(args.out, "soak"), log=log)
        parts.remove("soak")
        if not parts:
            return 0               # the soak wrote its own results; nothing else to write
    results = {"smoke": smoke, "machine": report.machine()}
    with tempfile.TemporaryDirectory(prefix="imgworker-bench-", dir="/var/tmp") as workdir:
        if "engine" in parts:
            log("renditions engine: the standard job, one core")
            data = inputs.standard_job(smoke)
            results["engine"] = engine.run(data, reps, warmup=0 if smoke else 2, log=log)
            path = os.path.join(workdir, "standard.jpg")
            with open(path, "wb") as handle:
                handle.write(data)
            results["allocator"] = engine.allocator(path, 1 if smoke else 5, log=log)

        photo = inputs.upload(smoke)
        if "ingest" in parts:
            log(f"ingest: {len(photo) // 1000} KB uploads through nginx, wrk on the same cores")
            results["ingest"] = ingest.run(workdir, AMQP_URL, photo,
                                           connections=4 if smoke else 32,
                                           seconds=1 if smoke else 5,
                                           repetitions=1 if smoke else 3, log=log)

        if "endtoend" in parts:
            rate, sample = endtoend.engine_rate(workdir, photo, 3 if smoke else 15)
            results["engine_2mp"] = (rate, sample)
            log(f"end to end: one process renders the 2 MP job at {rate:.1f}/s ({sample} per job)")
            cores = os.cpu_count() or 1
            # Each drain beside an engine rate measured just before it: on
            # this shared machine the engine alone varied by a third between
            # minutes, which made a ratio to one early measurement noise.
            results["drain"] = {}
            for workers in range(1, cores + 1):
                results["drain"][workers] = []
                for _ in range(1 if smoke else 3):
                    beside, _sample = endtoend.engine_rate(workdir, photo, 3 if smoke else 15)
                    together = beside if workers == 1 else endtoend.engines_side_by_side(
                        workdir, photo, 3 if smoke else 15, workers)
                    busy, alongside = [], ([] if workers < cores else None)
                    drained = endtoend.drain(workdir, AMQP_URL, photo,
                                             4 if smoke else 150 * workers, workers, busy=busy,
                                             alongside=alongside)
                    run = endtoend.DrainRun(drained, beside, together, busy[0],
                                            alongside[0] if alongside else None)
                    results["drain"][workers].append(run)
                    log(f"  {workers} worker(s) drain {drained:.1f} jobs/s "
                        f"({drained / (workers * beside):.0%} of {workers} x the engine rate, "
                        f"{beside:.1f}/s just before; {drained / together:.0%} of {workers} "
                        f"engines side by side, {together:.1f}/s"
                        + (f"; {drained / (workers * run.alongside):.0%} of {workers} x an "
                           f"engine alongside, {run.alongside:.1f}/s" if run.alongside else "")
                        + f"); renderers busy {busy[0]:.0%}")
            results["latency"] = endtoend.latency(workdir, AMQP_URL, photo, 3 if smoke else 40)
            log(f"  upload to rendition on an idle system: {results['latency']}")

        if "memory" in parts:
            log("memory: peak RSS over one job, fresh worker each")
            limits = config.load(os.devnull).api
            cap_png, cap_size = inputs.at_pixel_cap(limits.max_pixels, smoke)
            results["memory"] = {
                "12 MP JPEG (4000x3000)": memory.peak(workdir, AMQP_URL,
                                                      inputs.standard_job(smoke), "image/jpeg"),
                f"PNG at the pixel cap ({cap_size[0]}x{cap_size[1]}, "
                f"{len(cap_png) // 1_000_000} MB)": memory.peak(workdir, AMQP_URL, cap_png,
                                                                "image/png"),
            }
            for name, (main_mb, renderer_mb) in results["memory"].items():
                log(f"  {name}: worker {main_mb:.0f} MB, renderer {renderer_mb:.0f} MB")

        if "queues" in parts:
            log("queue types: one node classic, one node quorum, a 3-node cluster")
            results["queues"] = queues.run(workdir, AMQP_URL, photo, smoke, log=log)

        if "auth" in parts:
            log(f"auth: {len(photo) // 1000} KB uploads through nginx with no credentials, "
                "a key, a grant per upload")
            results["auth"] = auth.run(workdir, AMQP_URL, photo,
                                       connections=4 if smoke else 32,
                                       seconds=1 if smoke else 5,
                                       repetitions=1 if smoke else 3, log=log,
                                       profile=not smoke)

        if "fuzz" in parts:
            log("fuzz: hostile files through images.identify, hypothesis searching")
            results["fuzz"] = fuzz.run(smoke, log=log)

        if "erasure" in parts:
            log("erasure: an owner's jobs erased through DELETE /owners/<owner>/jobs, gc, and "
                "ingest and drain with the tombstone checks against the releases before")
            results["erasure"] = erasure.run(workdir, AMQP_URL, photo, smoke, log=log)

    markdown = report.write(results, args.out)
    log(f"wrote {markdown} and {os.path.join(args.out, 'chart.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
