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


# -- hostile inputs (issue 22): each a plain function returning the bytes ---------

def _tiff_flood(entries):
    """A big-endian TIFF directory of ``entries`` distinct tags Pillow does not
    know, each of type SHORT at offset 8 with a count that spans the whole
    blob (32,757 for 5,459 entries), so a parser that turns entries into
    tuples does quadratic work."""
    count = (12 * entries + 6) // 2           # the blob's bytes after offset 8, in SHORTs
    table = b"".join(struct.pack(">HHII", 0x2000 + i, 3, count, 8) for i in range(entries))
    return b"MM\x00*" + struct.pack(">IH", 8, entries) + table + b"\x00" * 4


def _jpeg_segment(marker, body):
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


def mpf_bomb(entries=5459, stray=True):
    """Issue 22 finding 1: SOI, one APP2 ``MPF`` segment holding a TIFF
    directory of ``entries`` entries (see _tiff_flood), then (``stray``) one
    stray 0x00 byte, then an ordinary 8x8 JPEG. 66 KB; Pillow 9.4 took an API
    process to 1.47 GB parsing it."""
    return (b"\xff\xd8" + _jpeg_segment(0xE2, b"MPF\x00" + _tiff_flood(entries))
            + (b"\x00" if stray else b"") + jpeg(8, 8)[2:])


def exif_bomb(entries=5459, stray=False):
    """Issue 22 finding 1, APP1 variant: the same directory as mpf_bomb in an
    ``Exif`` segment (an Orientation tag is not among its entries). Without
    ``stray`` the header walk vouches for it; Pillow parsing its Exif cost a
    renderer 350-380 MB."""
    return (b"\xff\xd8" + _jpeg_segment(0xE1, b"Exif\x00\x00" + _tiff_flood(entries))
            + (b"\x00" if stray else b"") + jpeg(8, 8)[2:])


def gif_comment_bypass(size, block=255, junk=b"\x00", junk_after=False):
    """Issue 22 finding 2: a 1x1 GIF89a with ``size`` bytes of comment in
    sub-blocks of ``block`` bytes, after (or, ``junk_after``, before the
    image and after) one unknown byte ``junk`` that a walk stopping at
    "damaged" never counts past. Pillow skips the byte and joins the comment
    blocks quadratically (4 MiB: 2.85 s in Pillow 9.4)."""
    base = encode(Image.new("P", (1, 1)), "GIF")
    start = 13 + (3 << ((base[10] & 7) + 1) if base[10] & 0x80 else 0)
    blocks = b"".join(bytes((len(piece),)) + piece for piece in
                      (b"c" * min(block, size - offset) for offset in range(0, size, block)))
    comment = b"\x21\xfe" + blocks + b"\x00"
    return base[:start] + (comment + junk if junk_after else junk + comment) + base[start:]


def _png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunk_flood(count, kind=b"iCCP", inflated=1 << 20, payload=None):
    """Issue 22 finding 3: a 1x1 PNG with ``count`` ``kind`` chunks (iCCP,
    zTXt, iTXt, or tEXt holding 100 bytes) before its IDAT, each about 1 KB
    of zlib that inflates to ``inflated`` bytes of zeros (Pillow inflates
    each up to its per-chunk cap), or to ``payload`` if given."""
    if kind == b"tEXt":
        body = b"k\x00" + b"t" * 100
    else:
        compressed = zlib.compress(b"\x00" * inflated if payload is None else payload, 9)
        body = {b"iCCP": b"icc\x00\x00", b"zTXt": b"k\x00\x00",
                b"iTXt": b"k\x00\x01\x00\x00\x00"}[kind] + compressed
    base = encode(Image.new("RGB", (1, 1)), "PNG")
    idat = base.index(b"IDAT") - 4
    return base[:idat] + _png_chunk(kind, body) * count + base[idat:]


def png_iccp_flood(count):
    """``count`` iCCP chunks of 1 MiB of zeros each (see png_chunk_flood)."""
    return png_chunk_flood(count, b"iCCP")


# -- hostile WebP and GIF metadata (issue 22, round two) ----------------------------

def _riff_chunk(kind, body):
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def _webp(chunks):
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_with(before=(), after=(), flags=0x2C, size=(8, 8)):
    """An extended (VP8X) WebP: an 8x8 lossless image of ``size`` canvas,
    with the chunks ``before`` it and ``after`` it (made with _riff_chunk,
    or any bytes), and VP8X ``flags`` (ICC 0x20, EXIF 0x08, XMP 0x04)."""
    image = encode(Image.effect_noise((8, 8), 60).convert("RGB"), "WEBP", lossless=True)
    vp8x = _riff_chunk(b"VP8X", bytes((flags, 0, 0, 0)) + struct.pack("<I", size[0] - 1)[:3]
                       + struct.pack("<I", size[1] - 1)[:3])
    return _webp([vp8x, *before, image[12:], *after])


def webp_exif_bomb(entries=5459, orientation=None):
    """Issue 22 finding 1 in a WebP: an EXIF chunk holding the TIFF directory
    of mpf_bomb (see _tiff_flood), after an 8x8 image. With ``orientation``,
    an ordinary directory with that Orientation tag instead. Pillow keeps
    the chunk as ``info["exif"]``; its full parser (getexif,
    exif_transpose) would turn every entry into tuples."""
    if orientation is None:
        tiff = _tiff_flood(entries)
    else:
        tiff = b"MM\x00*" + struct.pack(">IHHHIHHI", 8, 1, ORIENTATION, 3, 1, orientation, 0, 0)
    return webp_with(after=[_riff_chunk(b"EXIF", tiff)])


def webp_chunk_flood(count, kind=b"XMP ", body=b""):
    """An 8x8 WebP followed by ``count`` ``kind`` chunks holding ``body``:
    libwebp's demuxer keeps a record of each (3 million empty ones, 25 MB,
    took an identify to 120 MB in Pillow 9.4, 144 MB in Pillow 13)."""
    return webp_with(after=[_riff_chunk(kind, body)] * count)


def webp_frame_flood(frames):
    """An animated 8x8 WebP whose first frame is repeated ``frames`` times
    (449,389 in 25 MB took an identify to 65 MB in Pillow 9.4)."""
    frames_ = [Image.new("RGBA", (8, 8), (i * 60, 0, 0, 255)) for i in range(2)]
    data = encode(frames_[0], "WEBP", save_all=True, append_images=frames_[1:], duration=20)
    position, chunks = 12, []
    while position + 8 <= len(data):
        size = struct.unpack("<I", data[position + 4:position + 8])[0]
        chunks.append(data[position:position + 8 + size + (size & 1)])
        position += 8 + size + (size & 1)
    vp8x, anim, frame = chunks[0], chunks[1], chunks[2]
    return _webp([vp8x, anim] + [frame] * frames)


def webp_lying_chunk(claimed=0x7FFFFFFF, kind=b"XMP "):
    """An 8x8 WebP whose last chunk says it holds ``claimed`` bytes and holds
    100."""
    return webp_with(after=[kind + struct.pack("<I", claimed) + b"x" * 100])


def _gif_sub_blocks(payload, size=255):
    return b"".join(bytes((len(payload[i:i + size]),)) + payload[i:i + size]
                    for i in range(0, len(payload), size)) + b"\x00"


def gif_with(blocks):
    """A 1x1 GIF89a with ``blocks`` (bytes) between its colour table and its
    image."""
    base = encode(Image.new("P", (1, 1)), "GIF")
    start = 13 + (3 << ((base[10] & 7) + 1) if base[10] & 0x80 else 0)
    return base[:start] + blocks + base[start:]


def gif_application_flood(count, identifier=b"NETSCAPE2.0", payload=b"\x01\x00\x00"):
    """A 1x1 GIF with ``count`` application extensions before its image
    (Pillow 9.4 reads each in Python: 1.4 million NETSCAPE blocks, 26 MB,
    held an identify 3 s and a render 3.8 s)."""
    block = b"\x21\xff" + bytes((len(identifier),)) + identifier + _gif_sub_blocks(payload)
    return gif_with(block * count)


def gif_application_sub_blocks(size, block=1, identifier=b"XMP DataXMP"):
    """A 1x1 GIF with one application extension of ``size`` bytes in
    sub-blocks of ``block`` bytes (26 MB of 1-byte sub-blocks: 8 s in
    Pillow 9.4)."""
    full, rest = divmod(size, block)
    blocks = (bytes((block,)) + b"x" * block) * full
    if rest:
        blocks += bytes((rest,)) + b"x" * rest
    return gif_with(b"\x21\xff" + bytes((len(identifier),)) + identifier + blocks + b"\x00")


def gif_extension_flood(count, label=0xF9, body=b"\x00\x00\x00\x00"):
    """A 1x1 GIF with ``count`` extensions of ``label`` (graphic control
    blocks by default) before its image (3 million: 6.8 s in Pillow 9.4)."""
    return gif_with((b"\x21" + bytes((label,)) + _gif_sub_blocks(body)) * count)
