"""Hostile uploads, made to order: hypothesis strategies that assemble
valid-looking JPEG, PNG, GIF and WebP files from their segments, chunks and
blocks -- then mutate them -- and a probe that measures what identify costs
on each.

The strategies start from a real small image of each format (so many
examples open, and some even decode) and insert, drop or replace its parts
with generated ones: metadata directories with huge counts, frames of
extreme sizes, floods of ancillary chunks, stray bytes between segments,
bad lengths and CRCs, truncation. Every file stays under MAX_BYTES, so an
example costs milliseconds unless the code under test makes it cost more.

The probe runs ``images.identify`` in a long-lived child process. Pillow
allocates in C, which tracemalloc does not see; the child resets its peak
RSS (``/proc/self/clear_refs``) before each call and reads VmHWM after it,
so the figure is everything the call touched, C included, for the price of
two small file writes. The child also keeps a hostile input from taking
the test run with it: it is held to a data limit, and killed past a timeout.
"""

import ctypes
import io
import multiprocessing
import resource
import struct
import time
import typing
import zlib

from hypothesis import strategies as st
from PIL import Image

from . import samples

#: The property's bounds on one identify (issue 22, "What done looks like"):
#: tests/test_fuzz.py asserts them, bench/fuzz.py reports against them.
IDENTIFY_SECONDS = 0.5
IDENTIFY_BYTES = 64 << 20

#: The largest file a strategy makes: examples stay fast, and a cost that
#: grows with size still shows at this size.
MAX_BYTES = 256 << 10

#: Sizes a header may claim: the edges of every field width and of the
#: limits (max_dimension, max_pixels), and ordinary ones.
_EXTREME = (0, 1, 2, 8, 255, 256, 16383, 16384, 20000, 20001, 32767, 32768, 65535)


def _size(bits):
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([v for v in _EXTREME if v <= top] + [top]),
                     st.integers(0, top))


def _base(fmt, **options):
    """A real 8x8 image with detail, encoded by Pillow."""
    image = Image.effect_noise((8, 8), 60).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _animated_webp():
    frames = [Image.new("RGBA", (8, 8), (i * 60, 0, 0, 255 - i * 40)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=20)
    return buffer.getvalue()


@st.composite
def _mutated(draw, data):
    """Truncation and a few flipped bytes, sometimes."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0 and len(data) > 2:
        data = data[:draw(st.integers(1, len(data) - 1))]
    return bytes(data[:MAX_BYTES])


def _assemble(draw, base_parts, new_part, head_count):
    """The base's parts with generated ones inserted, some of its own
    dropped or repeated; the first ``head_count`` parts stay first."""
    parts = list(base_parts)
    for _ in range(draw(st.integers(0, 2))):
        if len(parts) > head_count:
            del parts[draw(st.integers(head_count, len(parts) - 1))]
    inserts = draw(st.lists(new_part, max_size=12))
    for part in inserts:
        parts.insert(draw(st.integers(head_count, len(parts))), part)
    if draw(st.integers(0, 5)) == 0 and len(parts) > head_count:   # one part many times
        part = parts[draw(st.integers(head_count, len(parts) - 1))]
        repeat = draw(st.integers(2, max(2, min(2000, MAX_BYTES // max(1, len(part))))))
        parts.insert(head_count, part * repeat)
    return b"".join(parts)


@st.composite
def _rebuilt(draw, bases, header, header_at, part, head_count):
    """One of ``bases`` (lists of parts), its header part (at ``header_at``)
    sometimes replaced by a generated one, then _assemble'd and _mutated."""
    base = list(draw(st.sampled_from(bases)))
    if draw(st.integers(0, 2)) == 0:
        base[header_at] = draw(header)
    return draw(_mutated(_assemble(draw, base, part, head_count)))


# -- TIFF (Exif, MPF, PNG eXIf, WebP EXIF) --------------------------------------

#: Tags that point at another directory: a loop or a far pointer is the trap.
_IFD_POINTERS = (0x8769, 0x8825, 0xA005, 0x014A)
_KNOWN_TAGS = (0x0112, 0x010F, 0x0110, 0x0132, 0x927C, 0x9286, 0xB000, 0xB001, 0xB002,
               0x0201, 0x0202, *_IFD_POINTERS)


@st.composite
def tiff(draw, max_entries=400):
    """A TIFF header and directory: many entries, counts up to 2**32 - 1,
    offsets anywhere (often 8, so every entry spans the whole blob)."""
    big = draw(st.booleans())
    order = ">" if big else "<"
    entries = draw(st.integers(0, max_entries))
    distinct = draw(st.booleans())
    tag_pool = st.one_of(st.sampled_from(_KNOWN_TAGS), st.integers(0, 0xFFFF))
    kind = st.one_of(st.integers(1, 12), st.integers(0, 0xFFFF))
    count = st.one_of(st.sampled_from((0, 1, 4, 255, 32757, 65535, 0xFFFFFFFF)),
                      st.integers(0, 0xFFFFFFFF))
    offset = st.one_of(st.just(8), st.integers(0, 64), st.integers(0, 0xFFFFFFFF))
    template = (draw(tag_pool), draw(kind), draw(count), draw(offset))
    body = bytearray()
    for index in range(entries):
        if distinct:     # the reviewer's shape: one entry, repeated with fresh tags
            tag, kind_, count_, offset_ = template
            tag = (0xC000 + index) & 0xFFFF
        elif index < 24:
            tag, kind_, count_, offset_ = draw(tag_pool), draw(kind), draw(count), draw(offset)
        else:
            tag, kind_, count_, offset_ = template
        body += struct.pack(order + "HHII", tag, kind_, count_, offset_)
    next_ifd = draw(st.sampled_from((0, 8, 0xFFFFFFFF)))
    blob = ((b"MM\x00\x2a" if big else b"II\x2a\x00") + struct.pack(order + "I", 8)
            + struct.pack(order + "H", entries & 0xFFFF) + bytes(body)
            + struct.pack(order + "I", next_ifd))
    return blob + draw(st.binary(max_size=64))


# -- JPEG ---------------------------------------------------------------------

def _segment(marker, payload):
    return bytes((0xFF, marker)) + struct.pack(">H", min(len(payload) + 2, 0xFFFF)) + payload


def _jpeg_split(data):
    """SOI, the header's segments, then the rest (scan to EOI) as one part."""
    parts, position = [data[:2]], 2
    while position + 4 <= len(data) and data[position + 1] != 0xDA:
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        parts.append(data[position:position + 2 + length])
        position += 2 + length
    return parts + [data[position:]]


_JPEG_BASES = [_jpeg_split(_base("JPEG", quality=90)),
               _jpeg_split(_base("JPEG", quality=90, progressive=True))]


@st.composite
def _app(draw):
    n = draw(st.integers(0, 15))
    payload = draw(st.one_of(
        st.binary(max_size=2000),
        st.builds(lambda t: b"Exif\x00\x00" + t, tiff(max_entries=5400)),
        st.builds(lambda t: b"MPF\x00" + t, tiff(max_entries=5400)),
        st.builds(lambda seq, total, d: b"ICC_PROFILE\x00" + bytes((seq, total)) + d,
                  st.integers(0, 255), st.integers(0, 255), st.binary(max_size=2000)),
        st.builds(lambda d: b"JFIF\x00" + d, st.binary(max_size=32)),
    ))
    return _segment(0xE0 + n, payload[:0xFFFD])


@st.composite
def _sof(draw):
    marker = draw(st.sampled_from((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA,
                                   0xCB, 0xCD, 0xCE, 0xCF)))
    precision = draw(st.sampled_from((8, 12, 16, 0, 255)))
    components = draw(st.sampled_from((1, 3, 4, 0, 2, 255)))
    table = b"".join(bytes((i + 1, draw(st.sampled_from((0x11, 0x22, 0x44, 0x00, 0xFF))),
                            draw(st.integers(0, 4)))) for i in range(min(components, 8)))
    return _segment(marker, struct.pack(">BHHB", precision, draw(_size(16)), draw(_size(16)),
                                        components) + table)


@st.composite
def _dqt(draw):
    spec = draw(st.integers(0, 0x13))
    return _segment(0xDB, bytes((spec,)) + draw(st.binary(min_size=64, max_size=129)))


@st.composite
def _dht(draw):
    counts = draw(st.lists(st.integers(0, 255), min_size=16, max_size=16))
    symbols = draw(st.binary(max_size=min(sum(counts), 512)))
    return _segment(0xC4, bytes((draw(st.sampled_from((0x00, 0x01, 0x10, 0x11, 0xFF))),))
                    + bytes(counts) + symbols)


@st.composite
def _sos(draw):
    count = draw(st.sampled_from((1, 3, 4, 0, 255)))
    table = b"".join(bytes((i + 1, draw(st.integers(0, 255)))) for i in range(min(count, 4)))
    header = _segment(0xDA, bytes((count,)) + table + bytes((0, 63, 0)))
    scan = draw(st.binary(max_size=2000)).replace(b"\xff", b"\xff\x00")
    return header + scan


_jpeg_part = st.one_of(
    _app(), _sof(), _dqt(), _dht(), _sos(),
    st.builds(lambda d: _segment(0xFE, d), st.binary(max_size=1000)),            # COM
    st.builds(lambda d: _segment(0xDD, d), st.binary(min_size=2, max_size=2)),   # DRI
    st.binary(min_size=1, max_size=4),                                            # stray bytes
    st.sampled_from((b"\xff\xff\xff", b"\xff\xd9", b"\xff\xd8", b"\xff\x01", b"\xff\xd0")),
)


@st.composite
def jpegs(draw):
    base = draw(st.sampled_from(_JPEG_BASES))
    return draw(_mutated(_assemble(draw, base, _jpeg_part, head_count=1)))


# -- PNG ----------------------------------------------------------------------

def _chunk(kind, payload, crc=None):
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc & 0xFFFFFFFF)


def _png_split(data):
    parts, position = [data[:8]], 8
    while position + 8 <= len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        parts.append(data[position:position + 12 + length])
        position += 12 + length
    return parts


_PNG_BASES = [_png_split(_base("PNG")), _png_split(_base("PNG", optimize=True))]


@st.composite
def _crc(draw):
    return draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFFFFFF)))


@st.composite
def _ihdr(draw):
    payload = struct.pack(">IIBBBBB", draw(_size(32)), draw(_size(32)),
                          draw(st.sampled_from((1, 2, 4, 8, 16, 0, 3))),
                          draw(st.sampled_from((0, 2, 3, 4, 6, 1, 7))),
                          draw(st.sampled_from((0, 1))), draw(st.sampled_from((0, 1))),
                          draw(st.sampled_from((0, 1, 2))))
    return _chunk(b"IHDR", payload, draw(_crc()))


_zipped = st.one_of(
    st.builds(zlib.compress, st.binary(max_size=200)),
    st.builds(lambda n: zlib.compress(bytes(n), 9), st.integers(0, 4 << 20)),   # a small bomb
    st.binary(max_size=64),                                                       # not zlib
)


@st.composite
def _ancillary(draw):
    kind = draw(st.sampled_from((b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"eXIf", b"gAMA", b"cHRM",
                                 b"sRGB", b"pHYs", b"PLTE", b"tRNS", b"bKGD", b"acTL", b"fcTL",
                                 b"fdAT", b"tIME", b"sPLT", b"vpAg", b"IDAT", b"IEND")))
    keyword = draw(st.sampled_from((b"ICC Profile", b"Comment", b"XML:com.adobe.xmp", b"")))
    if kind in (b"iCCP", b"zTXt"):
        payload = keyword + b"\x00" + bytes((draw(st.sampled_from((0, 1))),)) + draw(_zipped)
    elif kind == b"iTXt":
        compressed = draw(st.booleans())
        payload = (keyword + b"\x00" + bytes((compressed, 0)) + b"en\x00\x00"
                   + (draw(_zipped) if compressed else draw(st.binary(max_size=2000))))
    elif kind == b"eXIf":
        payload = draw(tiff())
    elif kind in (b"tEXt",):
        payload = keyword + b"\x00" + draw(st.binary(max_size=2000))
    elif kind == b"IDAT":
        payload = draw(_zipped)
    else:
        payload = draw(st.binary(max_size=64))
    return _chunk(kind, payload, draw(_crc()))


_png_part = st.one_of(_ihdr(), _ancillary(), _ancillary(),
                      st.builds(lambda k, d: _chunk(k, d),                        # unknown
                                st.binary(min_size=4, max_size=4), st.binary(max_size=256)),
                      st.binary(min_size=1, max_size=4))


def pngs():
    return _rebuilt(_PNG_BASES, _ihdr(), 1, _png_part, head_count=2)


# -- GIF ----------------------------------------------------------------------

def _sub_blocks(payload, size=255):
    blocks = b"".join(bytes((len(payload[i:i + size]),)) + payload[i:i + size]
                      for i in range(0, len(payload), size))
    return blocks + b"\x00"


@st.composite
def _gif_screen(draw):
    flags = draw(st.sampled_from((0x80, 0x87, 0xF7, 0x00, 0x70)))
    table = bytes(3 << ((flags & 7) + 1)) if flags & 0x80 else b""
    table = table[:draw(st.integers(0, len(table)))] if draw(st.integers(0, 9)) == 0 else table
    return (draw(st.sampled_from((b"GIF89a", b"GIF87a")))
            + struct.pack("<HHBBB", draw(_size(16)), draw(_size(16)), flags, 0, 0) + table)


@st.composite
def _gif_extension(draw):
    label = draw(st.sampled_from((0xFE, 0xF9, 0xFF, 0x01, 0x00, 0x3B)))
    if label == 0xFE and draw(st.booleans()):       # a comment over many tiny sub-blocks
        size = draw(st.integers(1, 255))
        payload = bytes(size * draw(st.integers(1, MAX_BYTES // (size + 1) // 2)))
    elif label == 0xFF:
        payload = draw(st.sampled_from((b"NETSCAPE2.0", b"XMP DataXMP", b"ICCRGBG1012")))
        if draw(st.booleans()):                     # XMP's way: many tiny sub-blocks
            payload += bytes(draw(st.integers(0, MAX_BYTES // 3)))
            size = draw(st.integers(1, 4))
        else:
            payload += draw(st.binary(max_size=300))
            size = 255
    else:
        payload, size = draw(st.binary(max_size=1000)), draw(st.integers(1, 255))
    return b"\x21" + bytes((label,)) + _sub_blocks(payload, size)


@st.composite
def _gif_image(draw):
    flags = draw(st.sampled_from((0x00, 0x80, 0x87, 0x40, 0xC7)))
    table = bytes(3 << ((flags & 7) + 1)) if flags & 0x80 else b""
    code_size = draw(st.sampled_from((2, 8, 0, 12, 255)))
    return (b"\x2c" + struct.pack("<HHHHB", draw(_size(16)), draw(_size(16)), draw(_size(16)),
                                  draw(_size(16)), flags)
            + table + bytes((code_size,)) + _sub_blocks(draw(st.binary(max_size=600))))


def _gif_split(data):
    """Screen and table, the blocks after them as one part, the trailer."""
    flags = data[10]
    head = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    return [data[:head], data[head:-1], data[-1:]]


_GIF_BASES = [_gif_split(_base("GIF")), _gif_split(_base("GIF", comment=b"x" * 300))]

_gif_part = st.one_of(_gif_extension(), _gif_extension(), _gif_image(),
                      st.binary(min_size=1, max_size=3))


def gifs():
    return _rebuilt(_GIF_BASES, _gif_screen(), 0, _gif_part, head_count=1)


# -- WebP ---------------------------------------------------------------------

def _riff_chunk(kind, payload):
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")


def _webp_split(data):
    parts, position = [], 12
    while position + 8 <= len(data):
        length = struct.unpack("<I", data[position + 4:position + 8])[0]
        end = position + 8 + length + (length & 1)
        parts.append(data[position:end])
        position = end
    return parts


_WEBP_BASES = [_webp_split(_base("WEBP", quality=80)), _webp_split(_base("WEBP", lossless=True)),
               _webp_split(_animated_webp())]


@st.composite
def _vp8(draw):
    frame = (b"\x9d\x01\x2a" + struct.pack("<HH", draw(_size(16)), draw(_size(16))))
    return _riff_chunk(b"VP8 ", b"\x10\x02\x00" + frame + draw(st.binary(max_size=400)))


@st.composite
def _vp8l(draw):
    bits = draw(_size(14)) | (draw(_size(14)) << 14) | (draw(st.integers(0, 15)) << 28)
    return _riff_chunk(b"VP8L", b"\x2f" + struct.pack("<I", bits) + draw(st.binary(max_size=400)))


def _u24(value):
    return struct.pack("<I", value)[:3]


@st.composite
def _vp8x(draw):
    flags = draw(st.sampled_from((0x00, 0x02, 0x08, 0x10, 0x20, 0x3E, 0xFF)))
    return _riff_chunk(b"VP8X", bytes((flags, 0, 0, 0)) + _u24(draw(_size(24)))
                       + _u24(draw(_size(24))))


@st.composite
def _anmf(draw):
    header = (_u24(draw(_size(24))) + _u24(draw(_size(24))) + _u24(draw(_size(24)))
              + _u24(draw(_size(24))) + _u24(draw(st.integers(0, 1000))) + bytes((0,)))
    inner = b"".join(draw(st.lists(st.one_of(_vp8(), _vp8l()), max_size=2)))
    return _riff_chunk(b"ANMF", header + inner)


_webp_part = st.one_of(
    _vp8(), _vp8l(), _vp8x(), _anmf(),
    st.builds(lambda d: _riff_chunk(b"ANIM", d), st.binary(min_size=6, max_size=6)),
    st.builds(lambda d: _riff_chunk(b"ICCP", d), st.binary(max_size=2000)),
    st.builds(lambda t: _riff_chunk(b"EXIF", t), tiff()),
    st.builds(lambda d: _riff_chunk(b"ALPH", d), st.binary(max_size=200)),
    st.builds(lambda d: _riff_chunk(b"XMP ", d), st.binary(max_size=200)),
    # metadata chunks the walk must count, and sizes that lie
    st.builds(lambda t: _riff_chunk(b"EXIF", b"Exif\x00\x00" + t), tiff(max_entries=5400)),
    st.builds(lambda k, n: _riff_chunk(k, b"") * n,
              st.sampled_from((b"ICCP", b"EXIF", b"XMP ", b"ABCD", b"ANMF", b"ALPH")),
              st.integers(1, MAX_BYTES // 16)),
    st.builds(lambda k, n, d: k + struct.pack("<I", n) + d,
              st.sampled_from((b"ICCP", b"EXIF", b"XMP ", b"VP8 ", b"VP8L", b"ANMF")),
              st.sampled_from((0, 1, 0x7FFFFFFF, 0xFFFFFFFF)) | st.integers(0, 0xFFFFFFFF),
              st.binary(max_size=64)),
    st.binary(min_size=1, max_size=8))


@st.composite
def webps(draw):
    base = list(draw(st.sampled_from(_WEBP_BASES)))
    body = b"WEBP" + _assemble(draw, base, _webp_part, head_count=0)
    size = draw(st.one_of(st.just(len(body)), st.just(len(body)), st.integers(0, 0xFFFFFFFF)))
    return draw(_mutated(b"RIFF" + struct.pack("<I", size) + body))


#: Format name (as images names it) -> its strategy.
STRATEGIES = {"jpeg": jpegs(), "png": pngs(), "gif": gifs(), "webp": webps()}


# -- issue 22's findings 1-3 and round two's WebP and GIF metadata floods ------

#: Name -> the bytes' builder (harness/samples.py), at the sizes measured.
FINDINGS = {
    "1: MPF directory after a stray byte": lambda: samples.mpf_bomb(5459),
    "1: Exif directory after a stray byte": lambda: samples.exif_bomb(5459, stray=True),
    "1: Exif directory the header walk vouches for": lambda: samples.exif_bomb(5459),
    "2: GIF comments after a stray byte": lambda: samples.gif_comment_bypass(4 << 20),
    "3: PNG of 2,000 iCCP chunks": lambda: samples.png_iccp_flood(2000),
    # round two: WebP chunks and GIF extensions the walks did not count
    "1: WebP EXIF directory": lambda: samples.webp_exif_bomb(5459),
    "WebP of 3 million empty XMP chunks": lambda: samples.webp_chunk_flood(3 << 20),
    "WebP of 449,389 frames": lambda: samples.webp_frame_flood(449_389),
    "GIF of 1.4 million NETSCAPE blocks": lambda: samples.gif_application_flood(1_379_705),
    "GIF XMP of 13 million 1-byte sub-blocks": lambda: samples.gif_application_sub_blocks(13 << 20),
    "GIF of 3 million graphic control blocks": lambda: samples.gif_extension_flood(3 << 20),
}


# -- the probe ----------------------------------------------------------------

class Outcome(typing.NamedTuple):
    kind: str          # "ok", "refused" (images' own exceptions), "error", "timeout", "died"
    detail: str
    seconds: float
    peak_bytes: int    # VmHWM over the call less VmRSS before it; 0 if unknown

    def answered(self):
        return self.kind in ("ok", "refused")


def _status(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) << 10
    return 0


def _probe_child(connection, limits, headroom):
    from imgworker import images
    images.install_pillow_backstop(limits)
    libc = ctypes.CDLL(None)
    # An input that would take GBs fails here with MemoryError (reported),
    # not on the machine running the tests.
    data_limit = _status("VmData:") + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))
    while True:
        try:
            data = connection.recv_bytes()
        except EOFError:
            return
        # Memory freed by earlier examples but still resident would be
        # reused unseen: hand it back first, so VmHWM counts all this call
        # touches.
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")                       # VmHWM := VmRSS
        before = _status("VmRSS:")
        start = time.monotonic()
        try:
            kind, detail = "ok", repr(images.identify(data, limits))
        except (images.BadImage, images.UnsupportedFormat) as error:
            kind, detail = "refused", f"{type(error).__name__}: {error}"
        except BaseException as error:  # noqa: BLE001 - any other is what the property catches
            kind, detail = "error", f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - start
        connection.send(Outcome(kind, detail, seconds, max(0, _status("VmHWM:") - before)))


#: How long the probe's child may take to start.
_PROBE_START_SECONDS = 60


class Probe:
    """``images.identify`` in a child process, measured (see the module's
    docstring). ``timeout``: seconds before the child is killed; ``headroom``:
    bytes it may allocate above what it holds at start."""

    def __init__(self, limits, timeout=5.0, headroom=512 << 20):
        self._limits, self._timeout, self._headroom = limits, timeout, headroom
        self._context = multiprocessing.get_context("spawn")
        self._process = self._connection = None

    def _start(self):
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_probe_child, name="imgworker-fuzz-probe",
                                              args=(child, self._limits, self._headroom),
                                              daemon=True)
        self._process.start()
        child.close()
        self._connection = parent
        # The child's start (a fresh interpreter importing Pillow: seconds on
        # a loaded machine) is not the first example's to pay: an empty
        # input, answered at once, shows it is ready.
        self._connection.send_bytes(b"")
        if not self._connection.poll(_PROBE_START_SECONDS):
            raise RuntimeError(f"the probe did not start within {_PROBE_START_SECONDS} s")
        self._connection.recv()

    def close(self):
        if self._process is not None:
            self._connection.close()
            self._process.kill()
            self._process.join()
            self._process = self._connection = None

    def identify(self, data):
        if self._process is None:
            self._start()
        start = time.monotonic()
        try:
            self._connection.send_bytes(data)
            if self._connection.poll(self._timeout):
                return self._connection.recv()
            kind, detail = "timeout", f"no answer in {self._timeout:g} s"
        except (EOFError, OSError) as error:
            kind, detail = "died", f"the probe died ({error!r})"
        self.close()
        return Outcome(kind, detail, time.monotonic() - start, 0)
