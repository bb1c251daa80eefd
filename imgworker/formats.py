"""The image formats imgworker knows, in one table.

A format's names are repeated by the config's validation, the API's media
types, the nginx site's ``types`` block and doc/openapi.yaml; each of them is
derived from ``FORMATS`` or tested against it (tests/test_formats.py,
tests/test_shipped_files.py), so adding a format here is the one edit that
the others then follow or fail on. Standard library only: ``check-config``
reads it without loading Pillow.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    #: the name in config.ini, the job record and the API: ``jpeg``
    name: str
    #: Pillow's name, for ``Image.open(formats=...)`` and ``Image.save``
    pillow: str
    #: a rendition file's extension, which is all nginx types it by
    extension: str
    media_type: str
    #: accepted as an upload ([api] formats), once identified from its bytes
    upload: bool
    #: a rendition can be written in it ([renditions] FORMAT)
    output: bool = False
    #: the encoder takes a rendition's QUALITY; a lossless one ignores it
    lossy: bool = False
    #: the encoder keeps an alpha channel; without, transparency is flattened
    alpha: bool = True
    #: further encoder options, as (keyword, value) pairs
    options: tuple = ()

    def save_options(self, quality):
        """Keyword arguments for ``Image.save`` of a rendition at ``quality``."""
        return {**dict(self.options), **({"quality": quality} if self.lossy else {})}


FORMATS = (
    Format("jpeg", "JPEG", "jpg", "image/jpeg", upload=True, output=True, lossy=True,
           alpha=False),
    Format("png", "PNG", "png", "image/png", upload=True, output=True),
    # method: 0 (fastest) .. 6 (smallest); 4 is Pillow's default, named so
    # that a Pillow upgrade cannot change the renditions.
    Format("webp", "WEBP", "webp", "image/webp", upload=True, output=True, lossy=True,
           options=(("method", 4),)),
    Format("gif", "GIF", "gif", "image/gif", upload=True),
)

BY_NAME = {spec.name: spec for spec in FORMATS}
#: [api] formats may name these (the API identifies each from its bytes).
UPLOAD_FORMATS = tuple(spec.name for spec in FORMATS if spec.upload)
#: [renditions] FORMAT may name these.
OUTPUT_FORMATS = tuple(spec.name for spec in FORMATS if spec.output)
#: rendition file extension -> its format
BY_EXTENSION = {spec.extension: spec for spec in FORMATS if spec.output}


class UnknownFormat(ValueError):
    """A rendition format not in the table (a config the checks missed)."""


def output_format(name):
    """The Format a rendition named ``name`` is written in; UnknownFormat if
    none is, so no caller falls back to another format."""
    spec = BY_NAME.get(name)
    if spec is None or not spec.output:
        raise UnknownFormat(f"{name!r} is not a rendition format (known: "
                            + ", ".join(OUTPUT_FORMATS) + ")")
    return spec
