"""Renditions engine: the standard job on one core, engine by engine.

The standard job: a 12 MP JPEG (4000x3000 q90) to 1600, 800 and 200 px
(longest side) JPEGs at q85. Each engine runs it in this one process, one
after the other, so all share the machine's state; the baselines are
naive Pillow and a pyvips thumbnail chain. Between them, the levers one at a
time, so each one's share of the gain shows.

Quality: every output is compared with a reference made the slow, exact way
(full-size decode, LANCZOS straight to the output size, no encoding). An
engine passes when each output's PSNR against it is within 0.5 dB of what
naive Pillow's output (the same resize, then JPEG q85) scores: the
encoder's loss is allowed, the shortcuts may add at most 0.5 dB to it.
"""

import io
import math
import os
import subprocess
import sys
from dataclasses import dataclass

from PIL import Image, ImageChops

from imgworker import images
from imgworker.allocator import environment as malloc_environment
from imgworker.config import Rendition

from . import stats

#: The standard job's outputs: longest side 1600, 800, 200; JPEG q85.
RENDITIONS = tuple(Rendition(name, size, size, "fit", "jpeg", 85)
                   for name, size in (("large", 1600), ("medium", 800), ("small", 200)))
LIMITS = images.Limits(("jpeg", "png", "webp", "gif"), 50_000_000, 20_000)
PSNR_TOLERANCE_DB = 0.5
LANCZOS = Image.Resampling.LANCZOS


def _fit(size, box):
    scale = min(box / size[0], box / size[1], 1.0)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _jpeg(image, quality=85):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -- engines: bytes in, [(name, jpeg bytes)] out, largest first ---------------

def _decoded(data):
    """The JPEG decoded at the smallest DCT scale the largest output allows."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", _fit(image.size, RENDITIONS[0].width))
    image.load()
    return image


def naive_pillow(data):
    """Open, decode at full size, LANCZOS from full size for every output."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return [(r.name, _jpeg(image.resize(_fit(image.size, r.width), LANCZOS), r.quality))
            for r in RENDITIONS]


def draft_only(data):
    """Lever 1: decode at the smallest DCT scale the largest output allows
    (draft()); still LANCZOS from that for every output."""
    image = _decoded(data)
    return [(r.name, _jpeg(image.resize(_fit(image.size, r.width), LANCZOS), r.quality))
            for r in RENDITIONS]


def draft_derive(data):
    """Lever 2: + each output derived from the previous one (LANCZOS), as
    imgworker did before these benchmarks."""
    image = _decoded(data)
    outputs, source = [], image
    for r in RENDITIONS:
        source = source.resize(_fit(image.size, r.width), LANCZOS)
        outputs.append((r.name, _jpeg(source, r.quality)))
    return outputs


def draft_derive_reduce(data):
    """Lever 3: + reduce() (a box average) where a step is an exact integer
    factor; LANCZOS for the rest."""
    image = _decoded(data)
    outputs, source = [], image
    for r in RENDITIONS:
        size = _fit(image.size, r.width)
        factor = source.width // size[0]
        source = (source.reduce(factor) if factor > 1 and source.size == (size[0] * factor,
                                                                           size[1] * factor)
                  else source.resize(size, LANCZOS))
        outputs.append((r.name, _jpeg(source, r.quality)))
    return outputs


def imgworker_render(data):
    """imgworker.images.render as the worker runs it."""
    return [(o.rendition.name, o.data) for o in images.render(data, RENDITIONS, LIMITS)]


def pyvips_chain(data):
    """libvips (pyvips), as imgproxy uses it: thumbnail_buffer (shrink-on-
    load) for the largest, each smaller one from the previous."""
    import pyvips
    outputs = []
    image = pyvips.Image.thumbnail_buffer(data, RENDITIONS[0].width, height=RENDITIONS[0].height)
    # rendered once into memory, then saved and shrunk further (a streamed
    # image can be read only once)
    image = image.copy_memory()
    outputs.append((RENDITIONS[0].name, image.jpegsave_buffer(Q=RENDITIONS[0].quality)))
    for r in RENDITIONS[1:]:
        image = image.thumbnail_image(r.width, height=r.height)
        outputs.append((r.name, image.jpegsave_buffer(Q=r.quality)))
    return outputs


def pyvips_available():
    """True once pyvips is set up for a fair comparison: one thread (one
    core, like Pillow), and no operation cache (a repetition would otherwise
    be served from the last one)."""
    try:
        import pyvips
        pyvips.concurrency_set(1)
        pyvips.cache_set_max(0)
        return True
    except Exception:  # noqa: BLE001 - not installed, or no libvips
        return False


ENGINES = {
    "naive Pillow (baseline)": naive_pillow,
    "+ draft() decode": draft_only,
    "+ derive each size from the last": draft_derive,
    "+ reduce() for integer steps": draft_derive_reduce,
    "imgworker (images.render: + BILINEAR for the rest)": imgworker_render,
    "pyvips thumbnail chain (baseline)": pyvips_chain,
}


# -- quality ---------------------------------------------------------------------

def psnr(a, b):
    """Peak signal-to-noise ratio of two RGB images of one size, in dB."""
    histogram = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).histogram()
    squares = sum(count * (value % 256) ** 2 for value, count in enumerate(histogram))
    mse = squares / (a.width * a.height * 3)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def references(data):
    """The exact outputs: full-size decode, LANCZOS to each size, unencoded."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return {r.name: image.resize(_fit(image.size, r.width), LANCZOS) for r in RENDITIONS}


def quality(outputs, exact):
    """{name: PSNR in dB against the reference of that size}."""
    scores = {}
    for name, encoded in outputs:
        decoded = Image.open(io.BytesIO(encoded))
        reference = exact[name]
        if decoded.size != reference.size:
            # pyvips rounds sizes its own way; compare at the reference's size
            decoded = decoded.resize(reference.size, LANCZOS)
        scores[name] = psnr(decoded, reference)
    return scores


# -- the benchmark ---------------------------------------------------------------

@dataclass
class EngineResult:
    name: str
    sample: stats.Sample          # ms per standard job
    psnr: dict                    # output name -> dB
    note: str = ""

    @property
    def per_second(self):
        return 1000 / self.sample.median


def decode_only(data):
    """The floor: the DCT-scaled decode every Pillow engine above starts with."""
    _decoded(data)


def run(data, repetitions, warmup=2, log=print):
    """Every engine on ``data`` (one core: this process, sequentially)."""
    exact = references(data)
    floor = stats.repeat(lambda: decode_only(data), repetitions, warmup)
    log(f"  floor, draft() decode alone: {floor} per job")
    results = [EngineResult("floor: draft() decode alone, no outputs", floor, {})]
    for name, engine in ENGINES.items():
        if engine is pyvips_chain and not pyvips_available():
            log(f"  {name}: skipped, pyvips is not installed (script/bench installs it)")
            continue
        sample = stats.repeat(lambda: engine(data), repetitions, warmup)
        results.append(EngineResult(name, sample, quality(engine(data), exact)))
        log(f"  {name}: {sample} per job, {1000 / sample.median:.1f} images/s")
    return results


def quality_verdicts(results):
    """{engine name: worst shortfall in dB against naive Pillow's PSNR}."""
    naive = next(r for r in results if r.name.startswith("naive"))
    return {r.name: max(naive.psnr[name] - r.psnr[name] for name in naive.psnr)
            for r in results if r.psnr}


_PROBE = """
import os, sys
sys.path[:0] = sys.argv[1:2]
from bench import engine, stats
from imgworker import config, images
data = open(sys.argv[2], 'rb').read()
renditions = engine.RENDITIONS if sys.argv[4] == 'standard' else config.load(os.devnull).renditions
sample = stats.repeat(lambda: images.render(data, renditions, engine.LIMITS), int(sys.argv[3]), 2)
print(' '.join(map(str, sample.values)))
"""

#: The thresholds a renderer sets itself (imgworker/allocator.py), as the
#: environment glibc reads: keep it from returning image-sized buffers to
#: the kernel after every job and faulting them back.
MALLOC_TUNING = malloc_environment("render")


def in_fresh_process(data_path, repetitions, renditions="standard", malloc=MALLOC_TUNING):
    """images.render of the file in a new process with the given MALLOC_*
    environment: a Sample of ms per job. ``renditions``: the standard job's,
    or "default" (config.ini's default set, what workers make)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, repo, data_path, str(repetitions),
                          renditions], env={**env, **malloc}, check=True,
                         capture_output=True, text=True).stdout
    return stats.Sample([float(value) for value in out.split()], "ms")


def allocator(data_path, repetitions, log=print):
    """imgworker's engine in a fresh process with glibc's default malloc
    settings, then with imgworker's (allocator.py): {label: Sample of per-process medians}."""
    found = {}
    for label, malloc in (("glibc defaults", {}), ("imgworker's thresholds", MALLOC_TUNING)):
        found[label] = stats.Sample([in_fresh_process(data_path, repetitions, malloc=malloc).median
                                     for _ in range(3)], "ms")
        log(f"  imgworker engine, {label}: {found[label]} per job (median of 3 processes)")
    return found
