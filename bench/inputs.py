"""The benchmarks' inputs, generated (never downloaded): photo-like content
-- gradients, fractal detail, sensor-like noise -- from harness/samples.py,
so JPEG sizes and decode costs are those of photographs, not flat colour."""

import io

from PIL import Image, ImageFilter

from harness import samples


def standard_job(smoke=False):
    """The standard job's input: a 12 MP JPEG, 4000x3000 q90."""
    return samples.jpeg(400, 300, quality=90) if smoke else samples.jpeg(4000, 3000, quality=90)


def upload(smoke=False, target=495_000):
    """A 2 MP JPEG (1632x1224) whose quality is chosen to weigh about
    ``target`` bytes (495 KB: a phone photo after a client-side resize)."""
    image = samples.photo(*((163, 122) if smoke else (1632, 1224)))
    best = None
    for quality in range(95, 40, -1):
        data = samples.encode(image, "JPEG", quality=quality)
        if best is None or abs(len(data) - target) < abs(len(best) - target):
            best = data
    return best


def at_pixel_cap(max_pixels, smoke=False):
    """A PNG of nearly ``max_pixels`` (no DCT-scaled decode for PNG: the
    whole image is decoded), smooth enough to fit in a 25 MB upload."""
    width = 400 if smoke else int((max_pixels * 4 / 3) ** 0.5)
    height = width * 3 // 4
    image = samples.photo(width // 8, height // 8).filter(ImageFilter.GaussianBlur(1))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue(), (width, height)
