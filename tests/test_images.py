import io
import random
import time

import pytest
from PIL import Image

from imgworker import config, images
from harness import samples

LIMITS = images.Limits(formats=("jpeg", "png", "webp", "gif"), max_pixels=50_000_000,
                       max_dimension=20000)
DEFAULT_RENDITIONS = config.from_dict({}).renditions


def rendition(spec, name="out"):
    return config.parse_rendition(name, spec)


def decoded(output):
    image = Image.open(io.BytesIO(output.data))
    image.load()
    return image


def assert_no_metadata(data):
    image = Image.open(io.BytesIO(data))
    assert not image.getexif(), "EXIF written to an output"
    assert "exif" not in image.info and "xmp" not in image.info
    assert b"Exif\x00" not in data and b"TestCam" not in data


# -- identify: the API's header check -------------------------------------------

@pytest.mark.parametrize("fmt, data", [
    ("jpeg", samples.jpeg(64, 48)),
    ("png", samples.encode(samples.photo(64, 48), "PNG")),
    ("webp", samples.encode(samples.photo(64, 48), "WEBP")),
    ("gif", samples.encode(samples.photo(64, 48), "GIF")),
])
def test_identify_reads_format_and_size_from_the_bytes(fmt, data):
    assert images.identify(data, LIMITS) == images.ImageInfo(fmt, 64, 48)


@pytest.mark.parametrize("data", [
    b"", b"hello, this is text", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
    b"8BPS\x00\x01" + b"\x00" * 40,  # Photoshop
    samples.encode(samples.photo(16, 16), "BMP"),
])
def test_identify_refuses_what_is_not_an_accepted_format(data):
    with pytest.raises(images.UnsupportedFormat):
        images.identify(data, LIMITS)


def test_identify_refuses_a_format_taken_off_the_allowlist():
    limits = images.Limits(("jpeg",), LIMITS.max_pixels, LIMITS.max_dimension)
    with pytest.raises(images.UnsupportedFormat, match="png images are not accepted"):
        images.identify(samples.encode(samples.photo(8, 8), "PNG"), limits)


@pytest.mark.parametrize("width, height, message", [
    (20001, 10, "largest side accepted is 20000"),
    (10000, 10000, "at most 50000000 are accepted"),
    (0, 100, "header cannot be read|claims to be"),
])
def test_identify_refuses_sizes_over_the_limits_without_decoding(width, height, message):
    with pytest.raises(images.BadImage, match=message):
        images.identify(samples.png_header_only(width, height), LIMITS)


# -- render -------------------------------------------------------------------

def test_the_default_renditions_of_a_12_mp_jpeg_have_the_right_sizes_and_decode():
    outputs = images.render(samples.jpeg(4000, 3000), DEFAULT_RENDITIONS, LIMITS)
    sizes = {o.rendition.name: decoded(o).size for o in outputs}
    assert sizes == {"large": (1600, 1200), "medium": (800, 600), "thumb": (200, 200)}
    for output in outputs:
        assert (output.width, output.height) == decoded(output).size
        assert decoded(output).format == "JPEG"


def test_fill_covers_the_box_and_crops_the_centre():
    # Left third red, middle green, right third blue: a centre crop of a wide
    # image to a square keeps only green.
    image = Image.new("RGB", (900, 300), (255, 0, 0))
    image.paste((0, 255, 0), (300, 0, 600, 300))
    image.paste((0, 0, 255), (600, 0, 900, 300))
    (output,) = images.render(samples.encode(image, "PNG"), [rendition("100x100 fill png 100")], LIMITS)
    result = decoded(output)
    assert result.size == (100, 100)
    assert result.getpixel((5, 50)) == (0, 255, 0) and result.getpixel((94, 50)) == (0, 255, 0)


def test_a_small_original_is_never_enlarged():
    (fit, fill) = images.render(samples.jpeg(120, 90), [rendition("1600x1600 fit jpeg 85", "a"),
                                                        rendition("100x100 fill jpeg 85", "b")],
                                LIMITS)
    assert decoded(fit).size == (120, 90)
    assert decoded(fill).size == (100, 90)


@pytest.mark.parametrize("orientation, expected_size, red_corner", [
    (1, (400, 200), (0, 0)),        # upright already: red top-left
    (3, (400, 200), (399, 199)),    # rotated 180: red bottom-right
    (6, (200, 400), (199, 0)),      # rotate 90 cw to view: red top-right
    (8, (200, 400), (0, 399)),      # rotate 90 ccw to view: red bottom-left
])
def test_exif_orientation_is_applied_and_no_exif_or_gps_is_copied(orientation, expected_size,
                                                                 red_corner):
    data = samples.marked_jpeg(400, 200, orientation)
    assert b"TestCam" in data  # the input does carry EXIF and GPS
    (output,) = images.render(data, [rendition("400x400 fit png 100")], LIMITS)
    result = decoded(output).convert("RGB")
    assert result.size == expected_size
    red, green, blue = result.getpixel(red_corner)
    assert red > 200 and blue < 60, result.getpixel(red_corner)
    assert_no_metadata(output.data)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_no_output_format_carries_exif(fmt):
    (output,) = images.render(samples.marked_jpeg(300, 200, 6), [rendition(f"100x100 fit {fmt} 80")],
                              LIMITS)
    assert_no_metadata(output.data)


def test_a_rendition_in_an_unknown_format_is_refused_not_written_as_another_format():
    # Given a rendition the config's checks would refuse (a caller built it directly)
    bmp = config.Rendition("out", 100, 100, "fit", "bmp", 80)
    # When it is rendered, Then nothing is written in some other format
    with pytest.raises(images.UnknownRendition,
                       match=r"rendition out: 'bmp' is not a rendition format \(known: jpeg, png, webp\)"):
        images.render(samples.jpeg(300, 200), [bmp], LIMITS)


def test_a_rendition_in_an_unknown_mode_is_refused_not_made_as_a_fill():
    stretch = config.Rendition("out", 100, 100, "stretch", "jpeg", 80)
    with pytest.raises(images.UnknownRendition,
                       match="rendition out: mode 'stretch' is not one of fit, fill"):
        images.render(samples.jpeg(300, 200), [rendition("50x50 fit jpeg 80", "ok"), stretch],
                      LIMITS)


def test_the_modes_the_config_accepts_are_the_modes_images_makes():
    assert images.MODES == config.RENDITION_MODES
    for mode in config.RENDITION_MODES:
        (output,) = images.render(samples.jpeg(300, 200), [rendition(f"100x100 {mode} png 1")],
                                  LIMITS)
        assert (output.width, output.height) == {"fit": (100, 67), "fill": (100, 100)}[mode]


def test_a_cmyk_jpeg_becomes_an_rgb_rendition_with_its_colours():
    cmyk = Image.new("CMYK", (400, 300), (0, 255, 255, 0))  # pure red in CMYK
    (output,) = images.render(samples.encode(cmyk, "JPEG", quality=95),
                              [rendition("200x200 fit jpeg 90")], LIMITS)
    result = decoded(output)
    assert result.mode == "RGB"
    red, green, blue = result.getpixel((100, 75))
    assert red > 200 and green < 60 and blue < 60


def test_a_16_bit_grey_png_keeps_its_tones_instead_of_clipping_to_white():
    grey16 = Image.new("I;16", (300, 300), 0x8000)  # half intensity
    data = samples.encode(grey16, "PNG")
    (output,) = images.render(data, [rendition("100x100 fit png 100")], LIMITS)
    value = decoded(output).convert("L").getpixel((50, 50))
    assert 120 <= value <= 136, value


def test_transparency_is_kept_in_png_and_flattened_onto_white_in_jpeg():
    palette = Image.new("P", (200, 200), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 100, 200))     # left half red, right half index 0
    data = samples.encode(palette, "PNG", transparency=0)
    png, jpg = images.render(data, [rendition("100x100 fit png 100", "a"),
                                    rendition("100x100 fit jpeg 90", "b")], LIMITS)
    as_png = decoded(png)
    assert as_png.mode == "RGBA"
    assert as_png.getpixel((10, 50)) == (255, 0, 0, 255)
    assert as_png.getpixel((90, 50))[3] == 0
    as_jpg = decoded(jpg)
    assert as_jpg.mode == "RGB"
    assert min(as_jpg.getpixel((90, 50))) > 240        # white, not black
    assert as_jpg.getpixel((10, 50))[0] > 200


def test_an_animated_gif_renders_its_first_frame():
    frames = [Image.new("RGB", (120, 120), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = samples.encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    (output,) = images.render(data, [rendition("60x60 fit png 100")], LIMITS)
    assert decoded(output).convert("RGB").getpixel((30, 30)) == (255, 0, 0)


def test_a_truncated_jpeg_is_a_bad_image_with_a_readable_reason():
    with pytest.raises(images.BadImage, match="jpeg data cannot be decoded .*truncated"):
        images.render(samples.truncated_jpeg(), DEFAULT_RENDITIONS, LIMITS)


def test_a_jpeg_is_decoded_at_reduced_scale_and_each_size_derives_from_a_larger_one(monkeypatch):
    data = samples.jpeg(4000, 3000)
    steps = []
    original_resize, original_reduce = Image.Image.resize, Image.Image.reduce

    def resize(self, size, *args, **kwargs):
        steps.append(("resize", self.size, size))
        return original_resize(self, size, *args, **kwargs)

    def reduce(self, factor, *args, **kwargs):
        steps.append(("reduce", self.size, factor))
        return original_reduce(self, factor, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", resize)
    monkeypatch.setattr(Image.Image, "reduce", reduce)
    images.render(data, DEFAULT_RENDITIONS, LIMITS)
    # draft() decodes at 1/2 scale (2000x1500 >= 1600x1200), not 4000x3000;
    # medium comes from large by an exact 2x box average, thumb from medium.
    assert steps == [("resize", (2000, 1500), (1600, 1200)), ("reduce", (1600, 1200), 2),
                     ("resize", (800, 600), (267, 200))]


def test_a_file_renders_the_same_as_its_bytes(tmp_path):
    # The worker's renderer reads the original from disk by path
    data = samples.jpeg(1200, 900)
    path = tmp_path / "original"
    path.write_bytes(data)
    from_bytes = images.render(data, DEFAULT_RENDITIONS, LIMITS)
    from_file = images.render(str(path), DEFAULT_RENDITIONS, LIMITS)
    assert [(o.width, o.height, o.data) for o in from_file] == \
        [(o.width, o.height, o.data) for o in from_bytes]


def test_a_file_that_cannot_be_read_is_an_os_error_not_a_bad_image(tmp_path):
    # so the worker retries it instead of failing the job for good
    with pytest.raises(FileNotFoundError):
        images.render(str(tmp_path / "missing"), DEFAULT_RENDITIONS, LIMITS)


# -- ICC profiles: used to convert to sRGB, never copied ------------------------------

def srgb_profile():
    from PIL import ImageCms
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_a_client_payload_posing_as_an_icc_profile_is_never_copied_into_a_rendition(fmt):
    # Given a small image carrying a "profile" that is a web page: 4 MB, or
    # for PNG 900 KB (Pillow refuses iCCP chunks that inflate past 1 MB)
    payload = b"<html><script>alert(1)</script>" + b"A" * (900_000 if fmt == "png" else 4 << 20)
    data = samples.encode(samples.photo(64, 64), fmt.upper(), icc_profile=payload)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == payload
    # When every default rendition is made, and one in the upload's own format
    outputs = images.render(data, DEFAULT_RENDITIONS + (rendition(f"64x64 fit {fmt} 80"),), LIMITS)
    # Then no output carries the payload or any profile, and each stays small
    for output in outputs:
        assert b"<html>" not in output.data and b"AAAAAAAA" not in output.data
        assert decoded(output).info.get("icc_profile") is None
        assert len(output.data) < 20_000


def test_an_srgb_profile_is_applied_and_not_embedded_and_the_pixels_keep_their_colour():
    image = samples.photo(400, 300)
    tagged = images.render(samples.encode(image, "PNG", icc_profile=srgb_profile()),
                           (rendition("400x300 fit png 100"),), LIMITS)[0]
    plain = images.render(samples.encode(image, "PNG"), (rendition("400x300 fit png 100"),),
                          LIMITS)[0]
    assert decoded(tagged).info.get("icc_profile") is None
    difference = [abs(a - b) for a, b in zip(decoded(tagged).tobytes(), decoded(plain).tobytes())]
    assert max(difference) <= 2     # sRGB to sRGB: only rounding


# -- structures Pillow would spend unbounded time or memory on ------------------------

def gif_with_comment(size):
    return samples.encode(Image.new("P", (1, 1)), "GIF", comment=b"c" * size)


def png_with_ztxt_chunks(count, inflated=1 << 20):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for i in range(count):
        info.add_text(f"k{i}", "x" * inflated, zip=True)
    return samples.encode(Image.new("RGB", (8, 8)), "PNG", pnginfo=info)


def test_a_gif_with_megabytes_of_comments_is_refused_from_its_blocks_in_linear_time():
    data = gif_with_comment(4 << 20)
    started = time.process_time()
    with pytest.raises(images.BadImage, match=r"carries more than 65536 bytes of comments"):
        images.identify(data, LIMITS)
    assert time.process_time() - started < 1      # Pillow 9.4 alone: ~5 s
    assert images.identify(gif_with_comment(1000), LIMITS).format == "gif"


def test_a_jpeg_with_thousands_of_scans_is_refused_at_upload_and_at_render(tmp_path):
    data = samples.many_scans_jpeg(2000)
    with pytest.raises(images.BadImage, match="more than 100 scans"):
        images.identify(data, LIMITS)
    path = tmp_path / "original"
    path.write_bytes(data)
    with pytest.raises(images.BadImage, match="more than 100 scans"):
        images.render(str(path), DEFAULT_RENDITIONS, LIMITS)
    # An ordinary progressive JPEG is fine
    progressive = samples.encode(samples.photo(320, 240), "JPEG", progressive=True)
    assert images.identify(progressive, LIMITS).format == "jpeg"


@pytest.mark.parametrize("make", [
    lambda: samples.jpeg(640, 480),
    lambda: samples.encode(samples.photo(320, 240), "JPEG", progressive=True),
    lambda: samples.encode(samples.photo(300, 200).convert("L"), "JPEG"),
    lambda: samples.encode(samples.photo(300, 200).convert("CMYK"), "JPEG"),
    lambda: samples.marked_jpeg(400, 200, 6),
], ids=["baseline", "progressive", "grey", "cmyk", "exif-rotated"])
def test_a_jpegs_size_from_its_header_walk_is_what_pillow_reads(make):
    data = make()
    header = images._jpeg_header(data)
    assert header.plain
    with Image.open(io.BytesIO(data)) as image:
        assert (header.width, header.height) == image.size
    assert images.identify(data, LIMITS) == images.ImageInfo("jpeg", *image.size)


def test_a_jpeg_header_the_walk_cannot_vouch_for_is_refused():
    data = bytearray(samples.jpeg(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 2                           # two components: Pillow refuses
    assert not images._jpeg_header(bytes(data)).plain
    with pytest.raises(images.BadImage, match="header cannot be read"):
        images.identify(bytes(data), LIMITS)
    # and a walk that meets garbage before any scan gives up
    assert images._jpeg_header(samples.jpeg(64, 48)[:sof]) is None


def test_a_jpeg_over_the_size_limits_is_refused_from_its_header():
    data = bytearray(samples.jpeg(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    with pytest.raises(images.BadImage, match="the image is 30000x30000; the largest side"):
        images.identify(bytes(data), LIMITS)


def test_scans_repeated_after_a_baseline_jpegs_only_scan_cost_no_decoding(tmp_path):
    # Its header proves one scan holds every component, so the scans are not
    # counted at upload; libjpeg stops at the second scan instead of
    # decoding it: a failed job with a reason, at once.
    data = samples.many_scans_jpeg(20_000, progressive=False)
    assert images.identify(data, LIMITS).format == "jpeg"
    path = tmp_path / "original"
    path.write_bytes(data)
    started = time.process_time()
    with pytest.raises(images.BadImage):
        images.render(str(path), DEFAULT_RENDITIONS, LIMITS)
    assert time.process_time() - started < 1
    # the same scans after a progressive JPEG's are counted and refused
    with pytest.raises(images.BadImage, match="more than 100 scans"):
        images.identify(samples.many_scans_jpeg(2000), LIMITS)


def test_png_text_chunks_cannot_inflate_past_a_few_megabytes():
    import tracemalloc
    data = png_with_ztxt_chunks(63)
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(images.BadImage, match="Too much memory used in text chunks"):
            images.identify(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"identify peaked at {peak >> 20} MiB"    # was +65 MiB


# -- issue 22: what the header walks cannot vouch for is refused, in bounded cost -----

def refused(data, match, seconds=0.5, mebibytes=8):
    """Assert identify refuses ``data`` with a BadImage matching ``match``,
    within ``seconds`` and ``mebibytes`` of Python allocations (measured in
    a second call: tracing slows a walk's loop several times over)."""
    import tracemalloc
    started = time.perf_counter()
    with pytest.raises(images.BadImage, match=match):
        images.identify(data, LIMITS)
    took = time.perf_counter() - started
    assert took < seconds, f"identify took {took:.2f} s"
    tracemalloc.start()
    try:
        with pytest.raises(images.BadImage, match=match):
            images.identify(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mebibytes << 20, f"identify peaked at {peak >> 20} MiB"


def jpeg_segment_ends(data):
    """Offsets where each JPEG segment before the first scan ends."""
    ends, position = [], 2
    while data[position + 1] != 0xDA:
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        ends.append(position)
    return ends


@pytest.mark.parametrize("make", [samples.mpf_bomb, lambda: samples.exif_bomb(stray=True)],
                         ids=["APP2 MPF", "APP1 Exif"])
def test_a_jpeg_metadata_directory_behind_a_stray_byte_is_refused_not_parsed(make):
    # Before: the walk gave up, Pillow skipped the byte and parsed the
    # directory (Pillow 9.4: 36 s and 3.5 GB for MPF, 1.2 s and 360 MB for Exif)
    refused(make(), r"jpeg header cannot be read: byte 0x00 at offset \d+ where a marker")


@pytest.mark.parametrize("junk", [b"\x00", b"\x42", b"\xff\x00", b"\xff\xff\x00"])
def test_a_byte_that_starts_no_segment_anywhere_before_the_scan_is_refused(junk):
    data = samples.marked_jpeg(64, 48, 6)
    for end in jpeg_segment_ends(data):
        refused(data[:end] + junk + data[end:], "jpeg header cannot be read")


@pytest.mark.parametrize("make", [samples.exif_bomb, lambda: samples.mpf_bomb(stray=False)],
                         ids=["APP1 Exif", "APP2 MPF"])
def test_jpeg_metadata_directories_cost_nothing_to_identify_or_render(make, tmp_path):
    # Given a JPEG whose header walk vouches for it, but whose Exif or MPF
    # directory Pillow parses quadratically (before: 1.2 s and 360 MB to
    # render the Exif one, 73 s and 3.5 GB the MPF one, with Pillow 9.4)
    import tracemalloc
    path = tmp_path / "original"
    path.write_bytes(make())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        # When it is identified and rendered
        assert images.identify(path.read_bytes(), LIMITS) == images.ImageInfo("jpeg", 8, 8)
        outputs = images.render(str(path), DEFAULT_RENDITIONS, LIMITS)
        took, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then the directory is never parsed
    assert [decoded(output).size for output in outputs] == [(8, 8)] * 3
    assert took < 0.5 and peak < 8 << 20, (took, peak >> 20)


def test_the_icc_profile_and_orientation_survive_the_metadata_pillow_is_not_given(monkeypatch):
    # Given a JPEG with XMP, a comment, an ICC profile and EXIF orientation 6
    profile = srgb_profile()
    exif = Image.open(io.BytesIO(samples.marked_jpeg(8, 8, 6))).info["exif"]
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 200, 100))
    data = samples.encode(image, "JPEG", quality=95, exif=exif, icc_profile=profile,
                          comment=b"a comment")
    data = data[:2] + samples._jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x/>") + data[2:]
    seen = []
    original = images._ToSrgb.__init__
    monkeypatch.setattr(images._ToSrgb, "__init__",
                        lambda self, icc: seen.append(icc) or original(self, icc))
    # When it is rendered
    (output,) = images.render(data, [rendition("400x400 fit png 100")], LIMITS)
    # Then its profile was used, and it stands upright (red top-right)
    assert seen == [profile]
    result = decoded(output).convert("RGB")
    assert result.size == (200, 400)
    assert result.getpixel((199, 0))[0] > 200 and result.getpixel((0, 399))[2] > 200
    assert_no_metadata(output.data)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_orientation_read_from_exif_is_what_pillow_reads(order, orientation):
    import struct
    entries = [(0x010F, 2, 4, b"Cam\x00"), (0x0112, 3, 1, struct.pack(order + "HH", orientation, 0))]
    tiff = ((b"II" if order == "<" else b"MM") + struct.pack(order + "HIH", 42, 8, len(entries))
            + b"".join(struct.pack(order + "HHI", tag, kind, count) + value
                       for tag, kind, count, value in entries) + b"\x00" * 4)
    data = samples.encode(Image.new("RGB", (8, 8)), "JPEG", exif=b"Exif\x00\x00" + tiff)
    assert images._exif_orientation(tiff) == orientation
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation


@pytest.mark.parametrize("make", [
    lambda: samples.gif_comment_bypass(4 << 20),
    lambda: samples.gif_comment_bypass(32 << 10, junk_after=True),
    lambda: samples.gif_comment_bypass(4 << 20, junk=b"\x99"),
    lambda: samples.gif_comment_bypass(64 << 10, block=1),
], ids=["junk before", "junk after", "other junk", "one-byte blocks"])
def test_a_gif_with_a_byte_that_starts_no_block_is_refused_whatever_follows(make):
    # Before: the walk stopped counting at the byte, Pillow skipped it and
    # joined the comments (Pillow 9.4: 5.8 s for 4 MiB)
    refused(make(), r"the gif cannot be read: byte 0x[0-9a-f]{2} at offset \d+ where a block")


@pytest.mark.parametrize("make, match", [
    (lambda: samples.png_iccp_flood(300), "more than one iCCP"),
    (lambda: samples.png_iccp_flood(2), "more than one iCCP"),
    (lambda: samples.png_chunk_flood(2000, b"zTXt", 1000), "more than 64 metadata chunks"),
    (lambda: samples.png_chunk_flood(2000, b"iTXt", 1000), "more than 64 metadata chunks"),
    (lambda: samples.png_chunk_flood(65, b"tEXt"), "more than 64 metadata chunks"),
    (lambda: samples.png_chunk_flood(1, b"zTXt", payload=random.Random(22).randbytes(5 << 19)),
     "hold more than 2097152 bytes"),
], ids=["300 iCCP", "2 iCCP", "2000 zTXt", "2000 iTXt", "65 tEXt", "2.5 MB of zTXt"])
def test_png_metadata_chunk_floods_are_refused_from_the_chunks(make, match):
    # Before: each chunk inflated to Pillow's cap, however many there were
    # (Pillow 9.4: 2,000 iCCP chunks, 2 MB, took 17.7 s to identify)
    refused(make(), match)


def test_a_png_with_a_profile_text_and_exif_is_still_identified_and_rendered():
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for i in range(8):
        info.add_text(f"k{i}", "x" * 1000, zip=i % 2 == 0)
    exif = Image.Exif()
    exif[samples.ORIENTATION] = 6
    data = samples.encode(samples.photo(64, 48), "PNG", pnginfo=info, icc_profile=srgb_profile(),
                          exif=exif.tobytes())
    assert images.identify(data, LIMITS) == images.ImageInfo("png", 64, 48)
    (output,) = images.render(data, [rendition("64x64 fit png 100")], LIMITS)
    assert (output.width, output.height) == (48, 64)


# -- issue 22, round two: WebP chunks and GIF extensions, walked and bounded ----------

def marked_webp(orientation, **options):
    """A 400x200 WebP whose stored top-left quarter is red and the rest
    blue, with an EXIF Orientation tag."""
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 200, 100))
    exif = Image.Exif()
    exif[samples.ORIENTATION] = orientation
    exif[0x010F] = "TestCam"
    return samples.encode(image, "WEBP", exif=exif.tobytes(), **options)


def animated_webp():
    frames = [Image.new("RGBA", (50, 40), colour)
              for colour in ((255, 0, 0, 255), (0, 0, 255, 255))]
    return samples.encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)


@pytest.mark.parametrize("make", [
    lambda: samples.encode(samples.photo(64, 48), "WEBP"),
    lambda: samples.encode(samples.photo(64, 48), "WEBP", lossless=True),
    lambda: samples.encode(samples.photo(64, 48, "RGBA"), "WEBP"),
    lambda: samples.encode(samples.photo(64, 48), "WEBP", icc_profile=srgb_profile()),
    lambda: marked_webp(6),
    animated_webp,
    lambda: samples.webp_exif_bomb(),
], ids=["lossy", "lossless", "alpha", "icc", "exif", "animated", "exif-bomb"])
def test_a_webps_size_from_its_chunk_walk_is_what_pillow_reads(make):
    data = make()
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
    assert images.identify(data, LIMITS) == images.ImageInfo("webp", *size)


def test_a_webp_is_identified_without_pillow(monkeypatch):
    # Pillow copies a WebP two or three times over for libwebp (72 MiB for
    # 25 MB in Pillow 13) to learn only its canvas size
    def no_pillow(*args, **kwargs):
        raise AssertionError("identify opened a WebP with Pillow")
    monkeypatch.setattr(Image, "open", no_pillow)
    data = samples.webp_with(after=[samples._riff_chunk(b"XMP ", b"x" * (8 << 20))])
    assert images.identify(data, LIMITS) == images.ImageInfo("webp", 8, 8)


@pytest.mark.parametrize("orientation, expected_size, red_corner", [
    (1, (400, 200), (0, 0)), (3, (400, 200), (399, 199)), (6, (200, 400), (199, 0)),
    (8, (200, 400), (0, 399)),
])
@pytest.mark.parametrize("options", [{"lossless": True}, {"quality": 95}],
                         ids=["lossless", "lossy"])
def test_a_webps_orientation_is_read_from_its_exif_chunk_and_no_metadata_is_copied(
        orientation, expected_size, red_corner, options):
    data = marked_webp(orientation, **options)
    (output,) = images.render(data, [rendition("400x400 fit png 100")], LIMITS)
    result = decoded(output).convert("RGB")
    assert result.size == expected_size
    red, green, blue = result.getpixel(red_corner)
    assert red > 200 and blue < 60, result.getpixel(red_corner)
    assert_no_metadata(output.data)


def test_pillow_is_given_a_webps_image_and_profile_but_no_exif_xmp_or_unknown_chunks(monkeypatch):
    # Given a WebP with an ICC profile, XMP, an unknown chunk and an EXIF
    # chunk holding a directory Pillow's parser would turn into tuples
    data = samples.webp_with(before=[samples._riff_chunk(b"ICCP", srgb_profile())],
                             after=[samples._riff_chunk(b"XMP ", b"<x/>"),
                                    samples._riff_chunk(b"ABCD", b"?"),
                                    samples._riff_chunk(b"EXIF", samples._tiff_flood(5459))],
                             flags=0x2C)
    opened, seen = [], []
    original_open, original_init = Image.open, images._ToSrgb.__init__

    def spy(file, *args, **kwargs):
        image = original_open(file, *args, **kwargs)
        opened.append(dict(image.info))
        return image
    monkeypatch.setattr(Image, "open", spy)
    monkeypatch.setattr(images._ToSrgb, "__init__",
                        lambda self, icc: seen.append(icc) or original_init(self, icc))
    # When it is rendered
    outputs = images.render(data, DEFAULT_RENDITIONS, LIMITS)
    # Then Pillow saw its profile, which was used, and none of the rest
    (info,) = opened
    assert info.get("icc_profile") == srgb_profile() and seen == [srgb_profile()]
    assert "exif" not in info and "xmp" not in info
    assert [decoded(output).size for output in outputs] == [(8, 8)] * 3


def test_a_webp_exif_directory_costs_nothing_to_identify_or_render(tmp_path):
    # Given a WebP whose EXIF chunk holds issue 22's directory of 5,459
    # entries spanning the whole blob (Pillow's parser: quadratic)
    import tracemalloc
    path = tmp_path / "original"
    path.write_bytes(samples.webp_exif_bomb())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        # When it is identified and rendered
        assert images.identify(path.read_bytes(), LIMITS) == images.ImageInfo("webp", 8, 8)
        outputs = images.render(str(path), DEFAULT_RENDITIONS, LIMITS)
        took, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then the directory is read only for its orientation
    assert [decoded(output).size for output in outputs] == [(8, 8)] * 3
    assert took < 0.5 and peak < 8 << 20, (took, peak >> 20)


@pytest.mark.parametrize("make, match", [
    (lambda: samples.webp_chunk_flood(65), "the webp has more than 64 metadata chunks"),
    (lambda: samples.webp_chunk_flood(300_000, b"ICCP"), "the webp has more than 64 metadata"),
    (lambda: samples.webp_chunk_flood(300_000, b"ABCD"), "the webp has more than 64 metadata"),
    (lambda: samples.webp_frame_flood(20_000), "it has more than 16384 chunks"),
    (lambda: samples.webp_lying_chunk(), r"webp cannot be read: the XMP chunk at offset \d+ runs "
                                         "past its end"),
    (lambda: samples.webp_lying_chunk(kind=b"EXIF"), r"the EXIF chunk at offset \d+ runs past"),
    (lambda: b"RIFF\xff\xff\xff\x7f" + samples.webp_with()[8:], "its RIFF header says 2147483655 "),
    (lambda: samples.webp_with(after=[b"\x00\x01\x02\x03\x00\x00\x00\x00"]), "no chunk type at"),
    (lambda: samples.webp_with()[:60], "webp cannot be read"),
    (lambda: samples.webp_with(flags=0x02), "marked animated but has no animation"),
    (lambda: samples._webp([samples.webp_with()[12:30]]), "0 images where a still image has one"),
    (lambda: samples.webp_with(size=(4, 4)), "not one that fits its canvas"),
], ids=["65 XMP", "300,000 ICCP", "300,000 unknown", "20,000 frames", "lying XMP size",
        "lying EXIF size", "lying RIFF size", "no chunk type", "truncated", "no animation",
        "no image", "image past canvas"])
def test_webp_chunks_the_walk_cannot_vouch_for_are_refused(make, match):
    # Before: libwebp's demuxer recorded every chunk (3 million empty ones:
    # 120 MB in Pillow 9.4, 144 MB in Pillow 13), and Pillow copied the file
    refused(make(), match)


def test_a_webp_over_the_renderers_memory_is_refused_from_its_canvas():
    # An 8x8 image on a canvas libwebp allocates whole, twice (the renderer
    # peaked at 995 MiB for this canvas before the check)
    data = samples.webp_with(size=(16383, 3051))
    refused(data, r"decoding this 16383x3051 webp would take about \d+ MiB")


@pytest.mark.parametrize("make, match", [
    (lambda: samples.gif_application_flood(65), "more than 64 application extensions"),
    (lambda: samples.gif_application_flood(100_000), "more than 64 application extensions"),
    (lambda: samples.gif_application_sub_blocks(300 << 10, block=255),
     r"application extensions \(NETSCAPE, XMP, ICC\) hold more than 262144 bytes"),
    (lambda: samples.gif_application_sub_blocks(40_000, block=1), "extensions have more than 32768 "
                                                                  "sub-blocks"),
    (lambda: samples.gif_application_sub_blocks(600_000, block=1), "more than 262144 blocks and "),
    (lambda: samples.gif_extension_flood(16385), "more than 16384 extension blocks"),
    (lambda: samples.gif_with(b"\x21\x01" + samples._gif_sub_blocks(b"x" * 40_000, 1)),
     "more than 32768 sub-blocks"),
    (lambda: samples.gif_with(b"\x21\xfe" + b"\x01c" * 2000 + b"\x00"),
     "comments are in more than 1024 sub-blocks"),
], ids=["65 NETSCAPE", "100,000 NETSCAPE", "300 KiB of XMP", "40,000 1-byte XMP sub-blocks",
        "600,000 1-byte XMP sub-blocks", "16,385 graphic controls", "plain text of 40,000 "
        "sub-blocks", "a comment of 2,000 1-byte sub-blocks"])
def test_gif_extension_floods_are_refused_from_the_blocks(make, match):
    # Before: Pillow read every extension before the first image one
    # sub-block at a time (Pillow 9.4: 3-8 s for 26 MB; Pillow 13: 7-12 s)
    refused(make(), match)


def test_a_gif_with_ordinary_extensions_is_identified_and_rendered():
    # NETSCAPE, XMP (its ASCII bytes double as sub-block lengths), a
    # graphic control block per frame
    for upload in (samples.gif_application_flood(3),
                   samples.gif_application_sub_blocks(20_000, block=80),
                   samples.gif_extension_flood(100), samples.animated_gif(300)):
        info = images.identify(upload, LIMITS)
        (output,) = images.render(upload, [rendition("60x60 fit png 100")], LIMITS)
        assert info.format == "gif" and output.width == min(60, info.width)
