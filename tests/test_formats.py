"""The formats table is what every part of imgworker takes a format from:
the config's checks, the sniffer, the encoder and the API's media types.
(The nginx site: tests/test_shipped_files.py; doc/openapi.yaml:
tests/integration/test_openapi.py.)"""

import io

import pytest
from PIL import Image

from harness import samples
from imgworker import config, formats, images
from imgworker.api import Api

OUTPUTS = [spec for spec in formats.FORMATS if spec.output]
UPLOADS = [spec for spec in formats.FORMATS if spec.upload]


@pytest.mark.parametrize("spec", UPLOADS, ids=lambda spec: spec.name)
def test_every_upload_format_is_identified_from_its_bytes_and_accepted_by_default(spec):
    data = samples.encode(samples.photo(64, 48), spec.pillow)
    assert images.sniff_format(data) == spec.name
    assert spec.name in config.from_dict({}).api.formats


def test_the_config_accepts_exactly_the_tables_formats_and_says_which_they_are():
    assert config.KNOWN_FORMATS == formats.UPLOAD_FORMATS
    assert config.RENDITION_FORMATS == formats.OUTPUT_FORMATS
    assert f"#   FORMAT: {' | '.join(formats.OUTPUT_FORMATS)} " in config.template()
    with pytest.raises(ValueError, match="FORMAT must be one of " + ", ".join(formats.OUTPUT_FORMATS)):
        config.parse_rendition("big", "1600x1600 fit bmp 85")
    unknown = next(spec for spec in formats.FORMATS if not spec.output)
    with pytest.raises(ValueError, match="FORMAT must be one of"):
        config.parse_rendition("big", f"1600x1600 fit {unknown.name} 85")


@pytest.mark.parametrize("spec", OUTPUTS, ids=lambda spec: spec.name)
def test_a_rendition_is_written_and_served_in_the_format_the_table_gives(spec, tmp_path):
    # Given a rendition in this format, rendered and stored where the API serves it
    settings = config.from_dict({"storage": {"root": str(tmp_path)}})
    wanted = config.parse_rendition("out", f"100x100 fit {spec.name} 80")
    (output,) = images.render(samples.jpeg(300, 200), [wanted], images.Limits.from_config(settings))
    api = Api(settings)
    job_id = "0" * 32
    path = api.storage.rendition_path(job_id, wanted)
    assert path.endswith("/out." + spec.extension)
    (tmp_path / "renditions" / job_id).mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.write(output.data)

    # When a client asks for it
    answered = {}
    body = b"".join(api({"REQUEST_METHOD": "GET", "PATH_INFO": f"/renditions/{job_id}/out."
                         + spec.extension},
                        lambda status, headers: answered.update(status=status, headers=headers)))

    # Then it is the table's media type, and the bytes are that format
    assert answered["status"].startswith("200")
    assert dict(answered["headers"])["Content-Type"] == spec.media_type
    assert Image.open(io.BytesIO(body)).format == spec.pillow


def test_a_rendition_file_of_another_extension_is_not_served(tmp_path):
    api = Api(config.from_dict({"storage": {"root": str(tmp_path)}}))
    (tmp_path / "renditions" / ("0" * 32)).mkdir(parents=True)
    (tmp_path / "renditions" / ("0" * 32) / "out.gif").write_bytes(b"GIF89a")
    answered = {}
    api({"REQUEST_METHOD": "GET", "PATH_INFO": "/renditions/" + "0" * 32 + "/out.gif"},
        lambda status, headers: answered.update(status=status))
    assert answered["status"].startswith("404")
