"""The image work: identify an upload from its bytes, and make renditions.

Pure functions of bytes in, bytes out; no files, no broker, so the API, the
worker, the tests and the benchmarks all call the same code.

Rendering follows what makes stock Pillow fast and correct:
- JPEGs are decoded with ``draft()`` at the smallest DCT scale (1/2, 1/4,
  1/8) still at least as large as the largest rendition needs;
- each rendition is resized from the smallest image already made that is at
  least twice its size, else from the decoded original;
- an exact integer step is a box average (``reduce()``); any other step is
  BILINEAR, with ``reducing_gap`` for large factors. Against LANCZOS from
  the full-size image this loses a little fidelity and saves much of the
  time: the bench measures both, with PSNR (bench/results/results.md,
  "Renditions engine");
- EXIF orientation is applied, and no metadata (EXIF, GPS, XMP, ICC) is
  ever written to an output: an upload's ICC profile is used to convert its
  pixels to sRGB, the web's default, and is never copied (a client could
  otherwise have any bytes it likes served from the site).
"""

import contextlib
import io
import mmap
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageCms, PngImagePlugin, UnidentifiedImageError

from . import formats

#: Magic bytes -> format name; the only way a format is identified (never
#: the file name or the Content-Type a client sent).
_MAGIC = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (8, b"WEBP", "webp"),     # after b"RIFF" and a 4-byte length
)

#: EXIF Orientation tag value -> the transpose that shows the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112

#: A rendition is derived from an earlier, larger one only when that one is
#: at least this many times its size; closer than that, resampling twice
#: softens the result, so the decoded original is used instead.
_DERIVE_RATIO = 2.0

#: Scans (SOS markers) a JPEG may have. Progressive encoders write about
#: ten; each scan is another pass over the whole image, so thousands let a
#: few hundred KB hold a worker for its whole job_timeout.
MAX_JPEG_SCANS = 100

#: Comment bytes a GIF may carry. Pillow 9.4 (Debian 12) joins comment
#: blocks with ``comment += block``: quadratic in their number.
MAX_GIF_COMMENT_BYTES = 64 << 10

#: Application extensions a GIF may carry, and the bytes in them. Pillow
#: reads every extension before the first image one sub-block at a time in
#: Python (thousands of NETSCAPE blocks, or an XMP one of 1-byte sub-blocks:
#: 25 MB held an API thread 3-8 s in Pillow 9.4); real files carry one to
#: three (NETSCAPE2.0, XMP, an ICC profile) of kilobytes.
MAX_GIF_APPLICATION_EXTENSIONS = 64
MAX_GIF_APPLICATION_BYTES = 256 << 10

#: Extensions of any kind (graphic control, plain text, unknown labels) a
#: GIF may carry: an animation has one or two per frame, and each one before
#: the first image costs Pillow a few microseconds in Python (3 million
#: graphic control blocks: 6.8 s).
_MAX_GIF_EXTENSIONS = 1 << 14

#: Sub-blocks of a GIF's extensions, and of its comments: Pillow reads each
#: with two calls in Python, and joins comment sub-blocks with ``comment +=
#: block`` (64 KiB of comment in 1-byte sub-blocks: 0.37 s in Pillow 9.4).
#: Encoders write 255 bytes in each; an XMP packet's ASCII makes sub-blocks
#: of about 80 (its bytes double as lengths).
_MAX_GIF_EXTENSION_SUB_BLOCKS = 1 << 15
_MAX_GIF_COMMENT_SUB_BLOCKS = 1 << 10

#: Blocks and sub-blocks walked in a GIF. Encoders write image data in
#: sub-blocks of 255 bytes, so an upload-sized file has about 100,000; the
#: cap bounds the walk's own time (25 MB of 1-byte sub-blocks: 1.6 s).
_MAX_GIF_BLOCKS = 1 << 18

#: What all of a PNG's text chunks may inflate to. Pillow's default is tens
#: of MB, which a small file of compressed zTXt chunks reaches, in the API
#: and in the renderer; renditions never carry text.
PngImagePlugin.MAX_TEXT_MEMORY = 2 << 20

#: Ancillary PNG chunks a file may carry besides the animation's frame
#: chunks (fcTL, fdAT): each iCCP, zTXt or iTXt is inflated by Pillow up to
#: its per-chunk cap, so their number, not only their size, must be bounded.
#: Real files carry a handful.
MAX_PNG_METADATA_CHUNKS = 64

#: Compressed bytes all of a PNG's iCCP, zTXt and iTXt chunks may hold:
#: a profile compresses to kilobytes, and the renditions carry no text.
MAX_PNG_COMPRESSED_METADATA = 2 << 20

#: Metadata chunks (EXIF, XMP, ICCP, unknown ones) a WebP may carry; real
#: files carry one of each at most. libwebp's demuxer keeps a record of
#: every chunk and Pillow copies the first of each kind; the renderer gives
#: Pillow none of them but a bounded profile (_webp_for_pillow).
MAX_WEBP_METADATA_CHUNKS = 64

#: Chunks of any kind walked in a WebP, animation frames (ANMF) included:
#: real animations have hundreds of frames, thousands at most. Bounds the
#: walk's own time (16,384 chunks: about 20 ms).
_MAX_WEBP_CHUNKS = 1 << 14

#: Chunks of any kind walked in a PNG; encoders write IDAT in chunks of
#: kilobytes, so a file under the upload limit has a few thousand at most.
_MAX_PNG_CHUNKS = 1 << 16

#: Larger "profiles" are not parsed: real ones are kilobytes (a printer's a
#: few hundred); the pixels are then taken as sRGB.
_MAX_ICC_BYTES = 1 << 20

_SRGB = ImageCms.createProfile("sRGB")

#: Background that transparent pixels become in formats without alpha.
_FLATTEN_BACKGROUND = (255, 255, 255)


class UnsupportedFormat(Exception):
    """The bytes are not one of the accepted formats (HTTP 415)."""


class BadImage(Exception):
    """An accepted format whose header is unreadable or whose size is over
    the limits (HTTP 422), or which cannot be decoded (a failed job). The
    message is written for a person."""


class UnknownRendition(Exception):
    """A rendition in a format or mode this code cannot make. The config's
    checks refuse it first; reaching here means they were bypassed, and
    making something else (a PNG, a fill) would hide that. Not a BadImage:
    the image is not at fault."""


#: How a rendition meets its box (config.RENDITION_MODES names the same;
#: tests/test_images.py ties them).
MODES = ("fit", "fill")


#: Bytes per pixel that decoding a WebP takes at its peak: libwebp's
#: animation decoder keeps two RGBA canvases, and Pillow copies one
#: (tests/integration/test_hostile_input.py's webp_bomb measures it).
_WEBP_DECODE_BYTES_PER_PIXEL = 16
#: What the renderer process holds besides pixels (the interpreter, Pillow).
_RENDERER_BASE_BYTES = 64 << 20


@dataclass(frozen=True)
class Limits:
    formats: tuple
    max_pixels: int
    max_dimension: int
    max_render_bytes: int = 768 << 20

    @classmethod
    def from_config(cls, config):
        return cls(config.api.formats, config.api.max_pixels, config.api.max_dimension,
                   config.worker.max_render_memory << 20)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class Output:
    rendition: object
    data: bytes
    width: int
    height: int


def install_pillow_backstop(limits):
    """Make Pillow refuse anything over our pixel cap even if a code path
    skipped the header check: its bomb warning becomes an error."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data):
    for offset, magic, name in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            if name == "webp" and data[:4] != b"RIFF":
                continue
            return name
    return None


#: Markers of a sequential Huffman frame (baseline, extended).
_SEQUENTIAL_SOF = (0xC0, 0xC1)
_OTHER_SOF = frozenset((0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
#: Frames Pillow opens: Huffman baseline, extended, progressive.
_PILLOW_SOF = (0xC0, 0xC1, 0xC2)
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))
#: Header segments walked before giving up on the fast path.
_MAX_HEADER_SEGMENTS = 256


@dataclass(frozen=True)
class _JpegHeader:
    width: int
    height: int
    #: Sequential, with every component in the first scan: libjpeg takes a
    #: further scan as an error (JERR_EOI_EXPECTED), not as another pass over
    #: the image, so the scans need no counting.
    one_scan: bool
    #: 8-bit, 1, 3 or 4 components, a frame type Pillow opens: what Pillow
    #: would read from this header is its size, nothing it could refuse.
    plain: bool


class _JpegWalk:
    """What the walk over a JPEG's segments found, up to its first scan."""

    def __init__(self, header, segments, scan):
        self.header = header
        #: (marker, start, end) of every segment before the first scan.
        self.segments = segments
        #: Where the first scan's SOS marker starts.
        self.scan = scan


def _walk_jpeg(data):
    """Walk the segments up to the first scan, refusing (BadImage) whatever
    the walk cannot vouch for: a byte where a marker should start (Pillow
    skips it and reads on), a reserved marker, a segment running past the
    end, more than _MAX_HEADER_SEGMENTS segments, a second frame, or no scan.
    Counting scans reads all of the data, and Pillow parses the header in
    Python: both showed in the API's profile of an upload, and this walk
    stops at the first scan."""
    position, frame, segments = 2, None, []

    def refuse(why):
        return BadImage(f"the jpeg header cannot be read: {why}")
    for _ in range(_MAX_HEADER_SEGMENTS):
        if position + 4 > len(data):
            raise refuse("it ends before its first scan")
        if data[position] != 0xFF:
            raise refuse(f"byte 0x{data[position]:02x} at offset {position} where a "
                         "marker should start")
        marker = data[position + 1]
        if marker == 0xFF:                      # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker < 0xC0 or marker in (0xD8, 0xD9):
            raise refuse(f"marker 0x{marker:02x} at offset {position} before its first scan")
        length = (data[position + 2] << 8) | data[position + 3]
        if length < 2 or position + 2 + length > len(data):
            raise refuse(f"the segment at offset {position} has an impossible length")
        if marker in _SEQUENTIAL_SOF or marker in _OTHER_SOF:
            if frame is not None or length < 8:
                raise refuse("it has a second frame, or a frame too short to be one")
            frame = (marker, data[position + 4],                          # precision
                     (data[position + 7] << 8) | data[position + 8],      # width
                     (data[position + 5] << 8) | data[position + 6],      # height
                     data[position + 9])                                  # components
        elif marker == 0xDA:                    # start of scan: its component count
            if frame is None or length < 3:
                raise refuse("a scan comes before the frame header")
            kind, precision, width, height, components = frame
            return _JpegWalk(_JpegHeader(width, height,
                                         kind in _SEQUENTIAL_SOF
                                         and data[position + 4] == components,
                                         kind in _PILLOW_SOF and precision == 8
                                         and components in (1, 3, 4)),
                             segments, position)
        segments.append((marker, position, position + 2 + length))
        position += 2 + length
    raise refuse(f"more than {_MAX_HEADER_SEGMENTS} segments before its first scan")


def _jpeg_header(data):
    """The frame's size and scan layout, or None where _walk_jpeg refuses."""
    try:
        return _walk_jpeg(data).header
    except BadImage:
        return None


def _plain_jpeg(data):
    """The walk of a JPEG whose header says everything Pillow would read
    from it; BadImage for any other (Pillow would refuse it, or parse what
    the walk did not vouch for)."""
    walk = _walk_jpeg(data)
    if not walk.header.plain:
        raise BadImage("the jpeg header cannot be read: imgworker decodes 8-bit "
                       "baseline and progressive JPEGs of 1, 3 or 4 components")
    return walk


#: APPn segments a rendition uses, by marker and the start of their body:
#: JFIF, the ICC profile, Adobe's colour transform (CMYK and YCCK). Every
#: other APPn and COM segment (MPF, XMP, Photoshop, comments) is metadata
#: that renditions never carry, so Pillow is not given it to parse; Exif is
#: read here, only for its Orientation tag (_exif_orientation).
_KEPT_APP = ((0xE0, b"JFIF\x00"), (0xE2, b"ICC_PROFILE\x00"), (0xEE, b"Adobe"))


def _jpeg_for_pillow(data, walk):
    """The header segments Pillow is to read (SOI, the frame's tables, and
    only the APPn segments in _KEPT_APP; no ICC chunks at all past
    _MAX_ICC_BYTES), and the Exif TIFF data found on the way (or None)."""
    head, icc, exif = [b"\xff\xd8"], [], None
    for marker, start, end in walk.segments:
        body = data[start + 4:end]
        if marker == 0xE1 and exif is None and body[:6] == b"Exif\x00\x00":
            exif = bytes(body[6:])
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            if not any(marker == kept and body[:len(prefix)] == prefix
                       for kept, prefix in _KEPT_APP):
                continue
            if marker == 0xE2:
                icc.append(len(head))
        head.append(bytes(data[start:end]))
    if sum(len(head[i]) - 18 for i in icc) > _MAX_ICC_BYTES:     # 18: marker, length, chunk header
        icc = set(icc)
        head = [segment for i, segment in enumerate(head) if i not in icc]
    return b"".join(head), exif


def _exif_orientation(exif):
    """The Orientation tag of Exif TIFF data (a leading ``Exif\\0\\0`` is
    skipped), 1 if there is none. Only the first directory's entries are
    read, each once: linear in the data, whatever it holds."""
    if not exif:
        return 1
    exif = bytes(exif[6:]) if exif[:6] == b"Exif\x00\x00" else bytes(exif)
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    if order is None or len(exif) < 8:
        return 1
    (directory,) = struct.unpack_from(order + "I", exif, 4)
    if directory + 2 > len(exif):
        return 1
    (entries,) = struct.unpack_from(order + "H", exif, directory)
    for entry in range(directory + 2, min(directory + 2 + 12 * entries, len(exif) - 11), 12):
        tag, kind, count = struct.unpack_from(order + "HHI", exif, entry)
        if tag == _EXIF_ORIENTATION:
            if count == 1 and kind in (3, 4):
                return struct.unpack_from(order + ("H" if kind == 3 else "I"), exif, entry + 8)[0]
            return 1
    return 1


class _Spliced(io.RawIOBase):
    """A file that reads as ``head`` followed by ``file`` from ``offset`` on:
    the JPEG Pillow opens, with header segments chosen by _jpeg_for_pillow
    and the scans read from the upload as they are decoded, never copied
    whole into memory. Closing it closes ``file``."""

    def __init__(self, head, file, offset):
        super().__init__()
        self._head, self._file, self._offset = head, file, offset
        self._size = len(head) + file.seek(0, io.SEEK_END) - offset
        self._position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer):
        view, done = memoryview(buffer).cast("B"), 0
        if self._position < len(self._head):
            piece = self._head[self._position:self._position + len(view)]
            view[:len(piece)] = piece
            done = len(piece)
        if done < len(view):
            self._file.seek(self._offset + self._position + done - len(self._head))
            done += self._file.readinto(view[done:]) or 0
        self._position += done
        return done

    def close(self):
        self._file.close()
        super().close()


def _jpeg_scans(data):
    """SOS markers, counted up to one past the cap. 0xFF in entropy-coded
    data is always followed by 0x00 or a restart marker, so FF DA occurs
    only as a marker (or inside an APPn segment, which only counts extra)."""
    scans, position = 0, data.find(b"\xff\xda")
    while position >= 0 and scans <= MAX_JPEG_SCANS:
        scans += 1
        position = data.find(b"\xff\xda", position + 2)
    return scans


def _check_gif_blocks(data):
    """Walk every block of a GIF (each sub-block is at most 255 bytes, so
    this is linear in the file) and refuse, as soon as the walk meets it,
    what Pillow would spend unbounded time on, or the walk could not vouch
    for: a byte that starts no block; more than MAX_GIF_COMMENT_BYTES of
    comments, or in more than _MAX_GIF_COMMENT_SUB_BLOCKS sub-blocks; more
    than MAX_GIF_APPLICATION_EXTENSIONS application extensions, or
    MAX_GIF_APPLICATION_BYTES in them; more than _MAX_GIF_EXTENSIONS
    extensions of any kind, or _MAX_GIF_EXTENSION_SUB_BLOCKS sub-blocks in
    them; more than _MAX_GIF_BLOCKS blocks and sub-blocks (which bounds the
    walk's own time)."""
    if len(data) < 13:
        return
    position = 13
    if data[10] & 0x80:                        # a global colour table
        position += 3 << ((data[10] & 7) + 1)
    comments = applications = application_bytes = extensions = steps = 0
    extension_sub_blocks = comment_sub_blocks = 0
    while position < len(data):
        block = data[position]
        if block == 0x3B:                      # trailer
            return
        if block == 0x21 and position + 1 < len(data):       # extension
            label, position = data[position + 1], position + 2
            extensions += 1
            if extensions > _MAX_GIF_EXTENSIONS:
                raise BadImage(f"the gif has more than {_MAX_GIF_EXTENSIONS} extension blocks "
                               "(an animation has one or two per frame)")
            if label == 0xFF:
                applications += 1
                if applications > MAX_GIF_APPLICATION_EXTENSIONS:
                    raise BadImage("the gif has more than "
                                   f"{MAX_GIF_APPLICATION_EXTENSIONS} application extensions "
                                   "(NETSCAPE, XMP, ICC)")
        elif block == 0x2C and position + 10 <= len(data):   # an image
            flags = data[position + 9]
            position += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
            label = None
        else:
            # Pillow skips a byte it does not know and reads on: a walk that
            # stopped here would let it read uncounted comments.
            raise BadImage(f"the gif cannot be read: byte 0x{block:02x} at offset "
                           f"{position} where a block should start")
        start, first_step = position, steps + 1
        steps = first_step
        while position < len(data) and data[position] and steps <= _MAX_GIF_BLOCKS:
            position += data[position] + 1                   # sub-blocks
            steps += 1
        if steps > _MAX_GIF_BLOCKS:
            raise BadImage(f"the gif has more than {_MAX_GIF_BLOCKS} blocks and sub-blocks "
                           "(encoders write image data in sub-blocks of 255 bytes)")
        if label is None:                       # image data: Pillow's decoder reads it
            position += 1
            continue
        sub_blocks = steps - first_step
        extension_sub_blocks += sub_blocks
        if extension_sub_blocks > _MAX_GIF_EXTENSION_SUB_BLOCKS:
            raise BadImage(f"the gif's extensions have more than {_MAX_GIF_EXTENSION_SUB_BLOCKS} "
                           "sub-blocks")
        if label == 0xFE:                       # the comment's bytes, without length bytes
            comments += position - start - sub_blocks
            comment_sub_blocks += sub_blocks
            if comments > MAX_GIF_COMMENT_BYTES:
                raise BadImage(f"the gif carries more than {MAX_GIF_COMMENT_BYTES} bytes of "
                               "comments")
            if comment_sub_blocks > _MAX_GIF_COMMENT_SUB_BLOCKS:
                raise BadImage(f"the gif's comments are in more than "
                               f"{_MAX_GIF_COMMENT_SUB_BLOCKS} sub-blocks (encoders write "
                               "255 bytes in each)")
        elif label == 0xFF:
            # With the length bytes: XMP of 1-byte sub-blocks costs Pillow
            # a read per byte.
            application_bytes += position - start
            if application_bytes > MAX_GIF_APPLICATION_BYTES:
                raise BadImage("the gif's application extensions (NETSCAPE, XMP, ICC) hold more "
                               f"than {MAX_GIF_APPLICATION_BYTES} bytes")
        position += 1


#: Chunks of a WebP's image: Pillow (libwebp's demuxer) is given these and
#: at most one bounded ICCP chunk (_webp_for_pillow); every other chunk --
#: EXIF (read here, only for its Orientation), XMP, unknown ones -- is
#: metadata that renditions never carry.
_WEBP_IMAGE_CHUNKS = frozenset((b"VP8X", b"ANIM", b"ANMF", b"ALPH", b"VP8 ", b"VP8L"))
#: VP8X flags: ICC profile, EXIF, XMP, animation.
_VP8X_ICC, _VP8X_EXIF, _VP8X_XMP, _VP8X_ANIMATION = 0x20, 0x08, 0x04, 0x02
#: A RIFF chunk's type and size.
_RIFF_CHUNK_HEADER = struct.Struct("<4sI")


class _WebpWalk:
    """What the walk over a WebP's chunks found (_walk_webp)."""

    def __init__(self, width, height, chunks, flags):
        #: The canvas: what libwebp allocates, and what Pillow reports.
        self.width, self.height = width, height
        #: (fourcc, start, end) of every chunk, padding included.
        self.chunks = chunks
        #: The VP8X flags; None for a simple file (one VP8 or VP8L chunk).
        self.flags = flags


def _webp_bitstream_size(kind, payload):
    """The size a VP8 (lossy) or VP8L (lossless) bitstream's header gives,
    or None if the header is not one."""
    if kind == b"VP8 ":
        if len(payload) < 10 or payload[0] & 1 or payload[3:6] != b"\x9d\x01\x2a":
            return None                         # not a key frame
        return ((payload[6] | payload[7] << 8) & 0x3FFF,
                (payload[8] | payload[9] << 8) & 0x3FFF)
    if len(payload) < 5 or payload[0] != 0x2F:
        return None
    bits = int.from_bytes(payload[1:5], "little")
    if bits >> 29:                              # a version other than 0
        return None
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _walk_webp(data):
    """Walk every chunk of a WebP (``data``: bytes or an mmap) and refuse
    (BadImage) what the walk cannot vouch for: a RIFF size past the end of
    the data, a chunk running past the RIFF's end or whose type is not four
    letters, more than _MAX_WEBP_CHUNKS chunks (libwebp's demuxer keeps a
    record of each: 3 million empty ones took 120 MB), more than
    MAX_WEBP_METADATA_CHUNKS metadata chunks, no image where the header
    says there is one. The canvas size comes from the walk alone, as
    libwebp reads it; the metadata is never parsed here."""
    def refuse(why):
        return BadImage(f"the webp cannot be read: {why}")
    if len(data) < 20:
        raise refuse("it ends before its first chunk")
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > len(data):
        raise refuse(f"its RIFF header says {end} bytes, and it has {len(data)}")
    chunks, position, metadata = [], 12, 0
    while position < end:
        if len(chunks) == _MAX_WEBP_CHUNKS:
            raise refuse(f"it has more than {_MAX_WEBP_CHUNKS} chunks")
        if position + 8 > end:
            raise refuse(f"a chunk header at offset {position} runs past its end")
        kind, size = _RIFF_CHUNK_HEADER.unpack_from(data, position)
        if not kind.isascii() or not kind.strip().isalnum():
            raise refuse(f"no chunk type at offset {position}")
        if position + 8 + size > end:
            raise refuse(f"the {kind.decode().strip()} chunk at offset {position} runs past "
                         "its end")
        if kind not in _WEBP_IMAGE_CHUNKS:
            metadata += 1
            if metadata > MAX_WEBP_METADATA_CHUNKS:
                raise BadImage(f"the webp has more than {MAX_WEBP_METADATA_CHUNKS} "
                               "metadata chunks")
        following = min(end, position + 8 + size + (size & 1))
        chunks.append((kind, position, following))
        position = following
    if not chunks:
        raise refuse("it has no chunks")
    kind, start, _ = chunks[0]
    first = data[start + 8:start + 8 + int.from_bytes(data[start + 4:start + 8], "little")]
    if kind in (b"VP8 ", b"VP8L"):              # a simple file: one still image
        size = _webp_bitstream_size(kind, first)
        if size is None or 0 in size:
            raise refuse(f"its {kind.decode().strip()} header is not an image's")
        return _WebpWalk(*size, chunks[:1], None)
    if kind != b"VP8X" or len(first) < 10:
        raise refuse(f"its first chunk is {kind!r}, not VP8, VP8L or VP8X")
    flags = first[0]
    width = int.from_bytes(first[4:7], "little") + 1
    height = int.from_bytes(first[7:10], "little") + 1
    kinds = [chunk[0] for chunk in chunks[1:]]
    if flags & _VP8X_ANIMATION:
        if b"ANIM" not in kinds or b"ANMF" not in kinds:
            raise refuse("it is marked animated but has no animation or no frame")
    else:
        stills = [chunk for chunk in chunks[1:] if chunk[0] in (b"VP8 ", b"VP8L")]
        if len(stills) != 1:
            raise refuse(f"it has {len(stills)} images where a still image has one")
        kind, start, _ = stills[0]
        size = _webp_bitstream_size(kind, data[start + 8:start + 18])
        if size is None or 0 in size or size[0] > width or size[1] > height:
            raise refuse(f"its {kind.decode().strip()} header is not an image's, or not "
                         "one that fits its canvas")
    return _WebpWalk(width, height, chunks, flags)


def _webp_for_pillow(data, walk):
    """The WebP Pillow is to read -- its image chunks, and its first ICCP
    chunk if it is at most _MAX_ICC_BYTES, the VP8X flags said accordingly
    -- and its EXIF data (or None), which Pillow is not given: only its
    Orientation is read, by _exif_orientation. The chunks are copied once,
    from bytes or an mmap."""
    if walk.flags is None:
        (_, start, end), = walk.chunks
        body, exif = [bytes(data[start:end])], None
    else:
        body, exif, icc = [], None, False
        flags = walk.flags & ~(_VP8X_ICC | _VP8X_EXIF | _VP8X_XMP)
        for kind, start, end in walk.chunks:
            size = int.from_bytes(data[start + 4:start + 8], "little")
            if kind == b"EXIF" and exif is None and walk.flags & _VP8X_EXIF:
                exif = bytes(data[start + 8:start + 8 + size])
            elif kind == b"ICCP" and not icc and walk.flags & _VP8X_ICC \
                    and size <= _MAX_ICC_BYTES:
                icc = True
                flags |= _VP8X_ICC
                body.append(bytes(data[start:end]))
            elif kind in _WEBP_IMAGE_CHUNKS:
                body.append(bytes(data[start:end]))
        body[0] = body[0][:8] + bytes((flags,)) + body[0][9:]     # the VP8X chunk comes first
    size = 4 + sum(len(chunk) for chunk in body)
    return b"".join([b"RIFF", size.to_bytes(4, "little"), b"WEBP", *body]), exif


#: PNG chunks whose bodies Pillow inflates.
_PNG_COMPRESSED = (b"iCCP", b"zTXt", b"iTXt")
#: Ancillary chunks of an animated PNG's frames, bounded only by _MAX_PNG_CHUNKS.
_PNG_FRAME_CHUNKS = (b"fcTL", b"fdAT")


def _check_png_chunks(data):
    """Walk every chunk of a PNG (Pillow reads those after the image data
    too, when it decodes) and refuse what would have Pillow inflate
    without bound: more than one iCCP (the PNG spec allows one), more than
    MAX_PNG_METADATA_CHUNKS ancillary chunks, more than
    MAX_PNG_COMPRESSED_METADATA bytes of iCCP, zTXt and iTXt, or a chunk
    type that is not four letters (Pillow stops there, but the walk could
    not vouch for what follows)."""
    position, metadata, compressed, profiles = 8, 0, 0, 0
    for _ in range(_MAX_PNG_CHUNKS):
        if position + 8 > len(data):
            return                              # truncated: Pillow cannot read on either
        length = int.from_bytes(data[position:position + 4], "big")
        kind = bytes(data[position + 4:position + 8])
        if not kind.isalpha() or not kind.isascii():
            raise BadImage(f"the png cannot be read: no chunk type at offset {position}")
        if kind == b"IEND":
            return
        if kind[0] > 0x5A and kind not in _PNG_FRAME_CHUNKS:       # ancillary
            metadata += 1
            if metadata > MAX_PNG_METADATA_CHUNKS:
                raise BadImage(f"the png has more than {MAX_PNG_METADATA_CHUNKS} "
                               "metadata chunks")
        if kind == b"iCCP":
            profiles += 1
            if profiles > 1:
                raise BadImage("the png has more than one iCCP (colour profile) chunk")
        if kind in _PNG_COMPRESSED:
            compressed += length
            if compressed > MAX_PNG_COMPRESSED_METADATA:
                raise BadImage("the png's compressed iCCP, zTXt and iTXt chunks hold more "
                               f"than {MAX_PNG_COMPRESSED_METADATA} bytes")
        position += 12 + length
    raise BadImage(f"the png has more than {_MAX_PNG_CHUNKS} chunks")


def _check_structure(fmt, data):
    """Refuse what Pillow would take unbounded time or memory to open or
    decode, from the bytes alone (``data``: bytes or an mmap)."""
    if fmt == "jpeg" and not getattr(_jpeg_header(data), "one_scan", False) \
            and _jpeg_scans(data) > MAX_JPEG_SCANS:
        raise BadImage(f"the jpeg has more than {MAX_JPEG_SCANS} scans (progressive "
                       "JPEGs have about ten)")
    if fmt == "png":
        _check_png_chunks(data)
    if fmt == "gif":
        _check_gif_blocks(data)


def _accepted_format(head, limits):
    fmt = sniff_format(head)
    if fmt is None:
        raise UnsupportedFormat("the data is not an image in a format imgworker knows "
                                "(it accepts " + ", ".join(limits.formats) + ")")
    if fmt not in limits.formats:
        raise UnsupportedFormat(f"{fmt} images are not accepted here "
                                "(accepted: " + ", ".join(limits.formats) + ")")
    return fmt


@contextlib.contextmanager
def _opened(source, limits):
    """_open, closing the image and the files opened for it at the end."""
    with contextlib.ExitStack() as closing:
        yield _open(source, limits, closing)


def _open(source, limits, closing):
    """Open (not decode) the image -- bytes, or the path of a file -- and
    check it against the limits. Returns the format, the image, and for a
    JPEG or a WebP its Exif TIFF data (which Pillow is not given: see
    _KEPT_APP, _webp_for_pillow).
    What is opened is closed by the ExitStack ``closing``."""
    exif = None
    if isinstance(source, (bytes, bytearray)):
        fmt = _accepted_format(source, limits)
        _check_structure(fmt, source)       # a WebP's is its walk, below
        file = io.BytesIO(source)
        if fmt == "jpeg":
            walk = _plain_jpeg(source)
            head, exif = _jpeg_for_pillow(source, walk)
            file = _Spliced(head, file, walk.scan)
        elif fmt == "webp":
            webp, exif = _webp_for_pillow(source, _walk_webp(source))
            file = io.BytesIO(webp)
    else:
        # A file is decoded as it is read: no copy of the whole upload in
        # memory beside its pixels (a fifth of the peak at the pixel cap).
        with open(source, "rb") as handle:
            fmt = _accepted_format(handle.read(16), limits)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if fmt == "webp":
                    # Pillow reads a WebP whole (libwebp demuxes it in
                    # memory): it reads only the chunks it is given.
                    webp, exif = _webp_for_pillow(mapped, _walk_webp(mapped))
                else:
                    _check_structure(fmt, mapped)
                if fmt == "jpeg":
                    walk = _plain_jpeg(mapped)
                    head, exif = _jpeg_for_pillow(mapped, walk)
        file = source
        if fmt == "jpeg":
            file = closing.enter_context(_Spliced(head, open(source, "rb"), walk.scan))
        elif fmt == "webp":
            file = io.BytesIO(webp)
    try:
        image = Image.open(file, formats=[formats.BY_NAME[fmt].pillow])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"the image has more than {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        # Pillow's message names a BytesIO object; say what it means instead.
        raise BadImage(f"the {fmt} header cannot be read: it is damaged, or declares "
                       "an impossible size") from None
    except (SyntaxError, ValueError, OSError, EOFError) as error:
        raise BadImage(f"the {fmt} header cannot be read ({error})") from None
    closing.callback(image.close)
    _check_size(fmt, *image.size, limits)
    return fmt, image, exif


def _check_size(fmt, width, height, limits):
    """Refuse a size over the limits, before any pixel is decoded."""
    if width < 1 or height < 1:
        raise BadImage(f"the image claims to be {width}x{height} pixels")
    if max(width, height) > limits.max_dimension:
        raise BadImage(f"the image is {width}x{height}; the largest side accepted "
                       f"is {limits.max_dimension} pixels")
    if width * height > limits.max_pixels:
        raise BadImage(f"the image is {width}x{height} = {width * height} pixels; "
                       f"at most {limits.max_pixels} are accepted")
    decoding = width * height * _WEBP_DECODE_BYTES_PER_PIXEL + _RENDERER_BASE_BYTES
    if fmt == "webp" and decoding > limits.max_render_bytes:
        raise BadImage(f"decoding this {width}x{height} webp would take about "
                       f"{decoding >> 20} MiB; at most "
                       f"{limits.max_render_bytes >> 20} MiB are allowed "
                       "([worker] max_render_memory)")


def identify(data, limits):
    """Format and size from the header alone, without decoding pixels.
    Raises UnsupportedFormat or BadImage."""
    fmt = _accepted_format(data, limits) if isinstance(data, (bytes, bytearray)) else None
    if fmt == "jpeg":
        # From the walk alone: Pillow would parse every APPn segment (MPF and
        # Exif directories quadratically) to learn nothing more.
        header = _plain_jpeg(data).header
        _check_structure("jpeg", data)
        _check_size("jpeg", header.width, header.height, limits)
        return ImageInfo("jpeg", header.width, header.height)
    if fmt == "webp":
        # From the walk alone too: Pillow copies the whole file two or three
        # times over to hand it to libwebp (48 MiB for a 25 MB upload with
        # Pillow 9.4, 72 MiB with Pillow 13), whose demuxer records every
        # chunk, to learn nothing more than the canvas size.
        walk = _walk_webp(data)
        _check_size("webp", walk.width, walk.height, limits)
        return ImageInfo("webp", walk.width, walk.height)
    with _opened(data, limits) as (fmt, image, _):
        return ImageInfo(fmt, *image.size)


# -- rendering ----------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    rendition: object
    scaled: tuple   # the whole upright image scaled to this size...
    final: tuple    # ...then centre-cropped to this (== scaled for fit)


def _plan(rendition, width, height):
    """Sizes for one rendition of an upright width x height image. Never
    enlarges: a small original stays its size (fit) or is only cropped (fill)."""
    box_w, box_h = rendition.width, rendition.height
    if rendition.mode == "fit":
        scale = min(box_w / width, box_h / height, 1.0)
    elif rendition.mode == "fill":
        scale = min(max(box_w / width, box_h / height), 1.0)
    else:
        raise _unknown_mode(rendition)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    if rendition.mode == "fit":
        return _Plan(rendition, scaled, scaled)
    return _Plan(rendition, scaled, (min(box_w, scaled[0]), min(box_h, scaled[1])))


def _unknown_mode(rendition):
    return UnknownRendition(f"rendition {rendition.name}: mode {rendition.mode!r} is not "
                            "one of " + ", ".join(MODES))


def _output_format(rendition):
    try:
        return formats.output_format(rendition.format)
    except formats.UnknownFormat as error:
        raise UnknownRendition(f"rendition {rendition.name}: {error}") from None


def _check_renditions(renditions):
    """Refuse, before any work, a rendition that could only be made wrong."""
    for rendition in renditions:
        if rendition.mode not in MODES:
            raise _unknown_mode(rendition)
        _output_format(rendition)


def _normalise_mode(image):
    """A mode every resampler and encoder handles, keeping alpha if any."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return image
    if mode.startswith("I") or mode == "F":
        # 16-bit (and 32-bit) greyscale: scale to 8 bits; a plain
        # convert("L") would clip everything above 255 to white.
        if mode != "I":
            image = image.convert("I") if mode.startswith("I;16") else image.convert("F")
        shift = 1 / 256 if mode.startswith("I;16") or mode == "I" else 1.0
        return image.point(lambda value: value * shift).convert("L")
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode == "RGBa":
        return image.convert("RGBA")
    if mode == "La":
        return image.convert("LA")
    # CMYK, YCbCr, LAB, HSV, RGBX
    return image.convert("RGB")


def _flatten(image):
    """Composite transparency onto white, for formats without alpha."""
    if image.mode == "LA":
        image = image.convert("RGBA")
    if image.mode != "RGBA":
        return image
    background = Image.new("RGBA", image.size, _FLATTEN_BACKGROUND + (255,))
    return Image.alpha_composite(background, image).convert("RGB")


class _ToSrgb:
    """Converts RGB(A) pixels from the upload's ICC profile to sRGB; a no-op
    when there is no usable RGB profile (then the pixels are taken as sRGB)."""

    def __init__(self, icc_profile):
        self._source = None
        self._transforms = {}
        if icc_profile and len(icc_profile) <= _MAX_ICC_BYTES:
            try:
                profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
                if profile.profile.xcolor_space.strip() == "RGB":
                    self._source = profile
            except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
                pass   # not a profile: whatever it is, it is dropped

    def __call__(self, image):
        if self._source is None or image.mode not in ("RGB", "RGBA"):
            return image
        if image.mode not in self._transforms:
            self._transforms[image.mode] = ImageCms.buildTransform(
                self._source, _SRGB, image.mode, image.mode)
        return ImageCms.applyTransform(image, self._transforms[image.mode])


def _encode(image, rendition):
    spec = _output_format(rendition)
    if not spec.alpha:
        image = _flatten(image)
    # Resized images inherit .info (EXIF, XMP, ICC, comments) from their
    # source; some encoders write what is there. Outputs carry no metadata.
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, spec.pillow, **spec.save_options(rendition.quality))
    return buffer.getvalue()


def _crop_centre(image, size):
    if image.size == size:
        return image
    left = (image.width - size[0]) // 2
    top = (image.height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def _resize(image, size):
    """Downscale ``image`` to ``size``, as cheaply as the quality allows."""
    if image.size == size:
        return image
    factor = image.width // size[0]
    if factor > 1 and image.size == (size[0] * factor, size[1] * factor):
        return image.reduce(factor)
    # Above 3x, reduce() first by an integer factor to within 3x of the
    # target, then resample: indistinguishable from resampling the whole way.
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def render(source, renditions, limits, progress=lambda: None):
    """Make every rendition of the image in ``source`` (bytes, or a path).

    Returns a list of Output, largest first. Raises UnsupportedFormat or
    BadImage (with a reason for a person) for anything that is not a
    decodable image within the limits, and UnknownRendition for a rendition
    in a format or mode that is not in formats.FORMATS or MODES.
    ``progress`` is called after each step, so a caller can tell a slow job
    from a hung one.
    """
    _check_renditions(renditions)
    with _opened(source, limits) as (fmt, image, exif):
        try:
            return _render(fmt, image, renditions, progress, exif)
        except (BadImage, UnsupportedFormat):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(f"the image has more than {limits.max_pixels} pixels") from None
        except MemoryError:
            raise BadImage(f"rendering it needs more than {limits.max_render_bytes >> 20} MiB "
                           "([worker] max_render_memory)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise   # the file could not be read (EIO, ...): not the image's fault
            raise BadImage(f"the {fmt} data cannot be decoded ({error})") from None


def _render(fmt, image, renditions, progress, exif):
    # Orientation from a bounded read of the Exif data, never Pillow's whole
    # parse of it (quadratic in crafted directories). A PNG's eXIf chunk may
    # follow its pixels; Pillow's getexif() loads them to find it, as here.
    if fmt == "png" and "exif" not in image.info:
        image.load()
    orientation = _exif_orientation(exif if fmt in ("jpeg", "webp") else image.info.get("exif")) \
        if fmt in ("jpeg", "webp", "png") else 1
    transpose = _UPRIGHT.get(orientation)
    sideways = orientation in (5, 6, 7, 8)
    width, height = image.size
    upright = (height, width) if sideways else (width, height)
    plans = sorted((_plan(r, *upright) for r in renditions),
                   key=lambda plan: plan.scaled[0] * plan.scaled[1], reverse=True)

    # An RGB source's profile converts its pixels to sRGB; a CMYK or grey
    # one describes other pixels than the converted ones, so it is dropped.
    to_srgb = _ToSrgb(image.info.get("icc_profile")
                      if image.mode in ("RGB", "RGBA", "P") else None)

    if fmt == "jpeg":
        need_w, need_h = plans[0].scaled
        if sideways:
            need_w, need_h = need_h, need_w
        image.draft(image.mode, (need_w, need_h))
    # Animated GIF/WebP: the file is positioned on its first frame.
    image.load()
    progress()
    # Resized in the source's orientation and turned upright only then: a
    # transpose of the full-size image would be one more copy of its pixels,
    # which a tiny WebP of the largest canvas turns into hundreds of MiB.
    base = _normalise_mode(image)

    def in_source(size):
        return (size[1], size[0]) if sideways else size

    made = []         # scaled images, in source orientation, to derive smaller ones
    outputs = []
    for plan in plans:
        target = in_source(plan.scaled)
        source = base
        for earlier in reversed(made):
            if (earlier.width >= _DERIVE_RATIO * target[0]
                    and earlier.height >= _DERIVE_RATIO * target[1]):
                source = earlier
                break
        scaled = _resize(source, target)
        made.append(scaled)
        upright = scaled.transpose(transpose) if transpose is not None else scaled
        final = _crop_centre(upright, plan.final)
        outputs.append(Output(plan.rendition, _encode(to_srgb(final), plan.rendition),
                              *final.size))
        progress()
    return outputs
