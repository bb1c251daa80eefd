"""Facts the nginx site and the unit files repeat from the config schema:
they cannot read config.ini, so this test fails when they part ways."""

import os
import re

from imgworker import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = config.from_dict({})


def shipped(*path):
    with open(os.path.join(REPO, *path)) as handle:
        return handle.read()


def test_nginx_takes_exactly_the_bodies_the_api_takes_and_says_so_in_its_413():
    site = shipped("nginx", "imgworker.conf")
    (size,) = re.findall(r"^\s*client_max_body_size (\d+)m;", site, re.MULTILINE)
    assert int(size) << 20 == DEFAULTS.api.max_upload_bytes
    assert f"the upload is larger than {size} MiB (client_max_body_size)" in site


def test_nginx_asks_for_the_same_retry_after_as_the_api():
    (seconds,) = re.findall(r"add_header Retry-After (\d+) always;", shipped("nginx", "imgworker.conf"))
    assert int(seconds) == DEFAULTS.api.retry_after


def test_nginx_and_the_units_name_the_default_storage_root_and_listen_address():
    site = shipped("nginx", "imgworker.conf")
    assert f"alias {DEFAULTS.storage.root}/renditions/;" in site
    assert f"server {DEFAULTS.api.listen} " in site
    for unit in ("imgworker@.service", "imgworker-api.service", "imgworker-sweep.service"):
        assert f"ReadWritePaths={DEFAULTS.storage.root}\n" in shipped("systemd", unit), unit
