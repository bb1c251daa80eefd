"""Facts the nginx site and the unit files repeat from the config schema:
they cannot read config.ini, so this test fails when they part ways."""

import os
import re

from imgworker import config, formats, units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = config.from_dict({})


def shipped(*path):
    with open(os.path.join(REPO, *path)) as handle:
        return handle.read()


LOCATIONS = ("nginx", "snippets", "imgworker-locations.conf")
HTTP_LEVEL = ("nginx", "conf.d", "imgworker.conf")


def test_nginx_takes_exactly_the_bodies_the_api_takes_and_says_so_in_its_413():
    site = shipped(*LOCATIONS)
    (size,) = re.findall(r"^\s*client_max_body_size (\d+)m;", site, re.MULTILINE)
    assert int(size) << 20 == DEFAULTS.api.max_upload_bytes
    assert f"the upload is larger than {size} MiB (client_max_body_size)" in site


def test_nginx_asks_for_the_same_retry_after_as_the_api():
    (seconds,) = re.findall(r"location @api_unavailable \{\s*add_header Retry-After (\d+) always;",
                            shipped(*LOCATIONS))
    assert int(seconds) == DEFAULTS.api.retry_after


def test_nginx_serves_each_rendition_format_with_the_tables_media_type_and_nothing_else():
    (block,) = re.findall(r"location /renditions/ \{.*?\btypes \{([^}]*)\}",
                          shipped(*LOCATIONS), re.DOTALL)
    served = {}
    for media_type, *extensions in (line.rstrip(";").split() for line in
                                    block.strip().splitlines() if line.strip()):
        served.update((extension, media_type) for extension in extensions)
    assert served == {spec.extension: spec.media_type for spec in formats.FORMATS if spec.output}


def test_nginx_and_the_units_name_the_default_storage_root_and_listen_address():
    assert f"alias {DEFAULTS.storage.root}/renditions/;" in shipped(*LOCATIONS)
    assert f"server {DEFAULTS.api.listen} " in shipped(*HTTP_LEVEL)
    for unit in ("imgworker@.service", "imgworker-api.service", "imgworker-sweep.service",
                 "imgworker-gc.service"):
        assert f"ReadWritePaths={DEFAULTS.storage.root}\n" in shipped("systemd", unit), unit


def test_both_sites_serve_the_same_locations_and_every_refusal_the_api_words_is_answered():
    for site in ("imgworker.conf", "imgworker-tls.conf"):
        assert "include /etc/nginx/snippets/imgworker-locations.conf;" in \
            shipped("nginx", "sites-available", site)
    locations = shipped(*LOCATIONS)
    # the reasons that are not 401 each have their status in @upload_refused
    from imgworker import auth
    for reason, (status, _message) in auth.REASONS.items():
        if status != 401:
            assert f"if ($imgworker_refusal = {reason}) {{\n        return {status} " in locations
    # add_header in a location drops the server's: each one repeats HSTS
    for block in re.findall(r"location [^{]*\{(.*?)\n\}", locations, re.DOTALL):
        if "add_header" in block:
            assert "add_header Strict-Transport-Security $imgworker_hsts always;" in block, block
    # each limit_req zone is defined once, at the http level, and used
    zones = re.findall(r"limit_req_zone \S+ zone=(\w+):", shipped(*HTTP_LEVEL))
    assert sorted(zones) == sorted(re.findall(r"limit_req zone=(\w+) ", locations))


def test_the_units_give_every_option_at_its_default_what_it_needs():
    # The pairs: a unit directive and the options it must outlast or outgrow
    assert {(pair.unit, pair.directive): pair.options for pair in units.PAIRS} == {
        ("imgworker@.service", "TimeoutStopSec"): (("worker", "job_timeout"),),
        ("imgworker@.service", "MemoryMax"): (("worker", "max_render_memory"),),
        ("imgworker-webhook.service", "TimeoutStopSec"): (("webhook", "timeout"),),
        ("imgworker-api.service", "TimeoutStopSec"): (),
        ("imgworker-api.service", "MemoryMax"): (("api", "workers"), ("api", "max_body_memory")),
    }
    for pair in units.PAIRS:
        text = shipped("systemd", pair.unit)
        (raw,) = re.findall(rf"^{pair.directive}=(.*)$", text, re.MULTILINE)
        parse = units.parse_seconds if pair.directive == "TimeoutStopSec" else units.parse_bytes
        assert parse(raw) >= pair.least(DEFAULTS), (pair.unit, pair.directive, pair.rule)


def test_the_api_units_stop_timeout_counts_on_the_graceful_timeout_gunicorn_is_given():
    from imgworker.notify import Notifier
    from imgworker.server import ApiServer
    assert ApiServer(DEFAULTS, Notifier()).cfg.graceful_timeout == units.API_GRACEFUL_TIMEOUT
