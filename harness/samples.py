"""Test images made on the fly: photo-like content (no flat colour, which
would hide resampling and orientation bugs), plus the awkward cases."""

import io
import struct
import zlib

from PIL import Image, ImageDraw

#: EXIF tag numbers.
ORIENTATION = 0x0112
GPS_IFD = 0x8825


def photo(width, height, mode="RGB"):
    """A deterministic photo-like image: gradients, fractal detail, noise."""
    base = max(width, height)
    red = Image.effect_mandelbrot((256, 256), (-2.0, -1.2, 0.8, 1.2), 60).resize((width, height))
    green = Image.linear_gradient("L").resize((width, height))
    blue = Image.effect_noise((width, height), 40)
    image = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(image)
    for i in range(0, base, max(1, base // 20)):
        draw.ellipse((i, i // 2, i + base // 10, i // 2 + base // 10), outline=(255, 255, 0), width=3)
    return image.convert(mode) if mode != "RGB" else image


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width=1200, height=900, quality=90, **options):
    return encode(photo(width, height), "JPEG", quality=quality, **options)


def marked_jpeg(width, height, orientation, gps=True):
    """A JPEG whose *stored* top-left quarter is pure red and the rest blue,
    with an EXIF Orientation tag (and GPS coordinates, which must never reach
    an output)."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "TestCam"  # Make
    if gps:
        exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def png_header_only(width, height):
    """A PNG whose IHDR claims width x height with a tiny (bogus) body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def truncated_jpeg():
    data = jpeg(800, 600)
    return data[: len(data) // 2]


def corrupt_scan_jpeg():
    """A JPEG whose entropy-coded data has a run of garbage in the middle."""
    data = bytearray(jpeg(800, 600))
    start = data.index(b"\xff\xda") + 200           # inside the first scan
    data[start:start + 400] = bytes((i * 37) % 255 for i in range(400))  # no 0xFF markers
    return bytes(data)


def many_scans_jpeg(scans=2000, progressive=True):
    """A progressive JPEG whose last scan is repeated ``scans`` times: each
    scan makes the decoder walk every coefficient again (the classic
    'many scans' decode-time attack; libjpeg only warns about it). With
    ``progressive=False``, a baseline JPEG's one scan repeated instead."""
    data = encode(photo(320, 240), "JPEG", quality=80, progressive=progressive)
    last_sos = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[last_sos:end] * scans + data[end:]


def animated_gif(frames=300, size=(200, 150)):
    images = [Image.new("P", size, i % 256) for i in range(frames)]
    for image in images:
        image.putpalette([(i * 7) % 256 for i in range(768)])
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=20)
