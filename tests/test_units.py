"""check-config's warnings when an option outgrows the unit that runs it
(imgworker/units.py), and where it reads the unit's values from."""

import math
import os

import pytest

from imgworker import cli, units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shipped_units(monkeypatch, tmp_path):
    """The checkout's unit files, as if installed with no systemd running;
    drop-ins go in the returned directory."""
    monkeypatch.setattr(units, "_systemctl", lambda *args: None)
    monkeypatch.setattr(units, "UNIT_DIRS", (os.path.join(REPO, "systemd"),))
    monkeypatch.setattr(units, "DROP_IN_DIRS", (str(tmp_path / "etc-systemd"),))
    return tmp_path / "etc-systemd"


def check_config(tmp_path, capsys, worker=""):
    path = tmp_path / "config.ini"
    path.write_text("[broker]\nurl = amqp://u:p@127.0.0.1:5672/v\n" + worker)
    status = cli.main(["--config", str(path), "check-config"])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.startswith("warning: ")]


def test_check_config_says_nothing_of_the_units_at_the_defaults(shipped_units, tmp_path, capsys):
    status, out, warnings = check_config(tmp_path, capsys)
    assert status == 0 and ": OK" in out
    assert warnings == []


def test_a_job_timeout_past_the_workers_stop_timeout_warns_with_the_drop_in_that_fixes_it(
        shipped_units, tmp_path, capsys):
    # Given job_timeout = 600, and imgworker@.service as shipped
    status, out, warnings = check_config(tmp_path, capsys, "[worker]\njob_timeout = 600\n")
    # Then check-config still passes the config, with one warning naming the
    # option, its value, the unit's directive and value, and the line to add
    assert status == 0 and ": OK" in out
    (warning,) = warnings
    assert "[worker] job_timeout = 600 needs TimeoutStopSec=630s or more on imgworker@.service" in warning
    assert "which has TimeoutStopSec=150s" in warning
    assert os.path.join(REPO, "systemd", "imgworker@.service") in warning
    assert "'systemctl edit imgworker@.service', add '[Service]' and 'TimeoutStopSec=630s'" in warning


@pytest.mark.parametrize("options, needs, unit, least", [
    # one render of 2 GiB, plus the worker's own 256 MiB
    ("[worker]\nmax_render_memory = 2048\n", "[worker] max_render_memory = 2048",
     "imgworker@.service", "2304M"),
    # 8 API processes, each holding up to 100 MiB of bodies: 8 x (100 + 96) + 96 MiB
    ("[api]\nworkers = 8\n", "[api] workers = 8 and [api] max_body_memory = 100",
     "imgworker-api.service", "1664M"),
])
def test_an_option_past_its_units_memory_max_warns_with_the_drop_in_that_fixes_it(
        shipped_units, tmp_path, capsys, options, needs, unit, least):
    # Given the option raised, under the unit's shipped MemoryMax=1G
    status, _out, warnings = check_config(tmp_path, capsys, options)
    # Then check-config says what the unit needs, and how to give it
    assert status == 0
    (warning,) = warnings
    assert f"{needs} needs MemoryMax={least} or more on {unit}" in warning
    assert "which has MemoryMax=1G" in warning
    assert f"'systemctl edit {unit}', add '[Service]' and 'MemoryMax={least}'" in warning


def test_a_webhook_timeout_past_the_senders_stop_timeout_warns(shipped_units, tmp_path, capsys):
    # A POST is bounded as a whole by [webhook] timeout (webhook.post), so
    # the sender's stop needs that plus the margin, not twice it: 25 s fits
    # under the shipped TimeoutStopSec=30, 26 s does not.
    _status, _out, warnings = check_config(tmp_path, capsys, "[webhook]\ntimeout = 26\n")
    (warning,) = warnings
    assert "[webhook] timeout = 26 needs TimeoutStopSec=31s or more on imgworker-webhook.service" \
        in warning
    _status, _out, warnings = check_config(tmp_path, capsys, "[webhook]\ntimeout = 25\n")
    assert warnings == []


def test_a_drop_in_that_raises_the_unit_silences_the_warning(shipped_units, tmp_path, capsys):
    # Given the drop-ins 'systemctl edit' would write, the later file winning
    (shipped_units / "imgworker@.service.d").mkdir(parents=True)
    (shipped_units / "imgworker@.service.d" / "override.conf").write_text(
        "[Service]\nTimeoutStopSec=5min\nMemoryMax=infinity\n")
    (shipped_units / "imgworker@.service.d" / "zz-later.conf").write_text(
        "[Service]\n# TimeoutStopSec=1\nTimeoutSec=11min\n")
    # When the options grow past the shipped unit
    _status, _out, warnings = check_config(
        tmp_path, capsys, "[worker]\njob_timeout = 600\nmax_render_memory = 8192\n")
    # Then the drop-ins' values are the unit's, and nothing is wrong
    assert warnings == []
    values = units.unit_values("imgworker@.service")
    assert values["TimeoutStopSec"][0] == 660
    assert values["MemoryMax"] == (math.inf, str(shipped_units / "imgworker@.service.d" /
                                                 "override.conf"))


def test_under_systemd_the_values_are_systemctls_and_a_unit_it_cannot_load_is_read_from_files(
        monkeypatch):
    asked = []

    def systemctl(*args):
        asked.append(args)
        if args[-1] == "imgworker@1.service":
            return "LoadState=loaded\nTimeoutStopUSec=2min 30s\nMemoryMax=infinity\n"
        return "LoadState=not-found\nTimeoutStopUSec=1min 30s\nMemoryMax=infinity\n"
    monkeypatch.setattr(units, "_systemctl", systemctl)
    monkeypatch.setattr(units, "UNIT_DIRS", (os.path.join(REPO, "systemd"),))
    monkeypatch.setattr(units, "DROP_IN_DIRS", ())
    assert units.unit_values("imgworker@.service") == {
        "TimeoutStopSec": (150, "systemctl show imgworker@1.service"),
        "MemoryMax": (math.inf, "systemctl show imgworker@1.service")}
    assert "--property=TimeoutStopUSec" in asked[0] and "--property=MemoryMax" in asked[0]
    # not loaded under systemd (a checkout on a laptop): the unit file's
    assert units.unit_values("imgworker-webhook.service")["TimeoutStopSec"] == (
        30, os.path.join(REPO, "systemd", "imgworker-webhook.service"))


def test_a_unit_installed_nowhere_is_not_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(units, "_systemctl", lambda *args: None)
    monkeypatch.setattr(units, "UNIT_DIRS", (str(tmp_path),))
    from imgworker import config
    assert units.violations(config.from_dict({"worker": {"job_timeout": "6000"}})) == []


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("90s", 90), ("1min 30s", 90), ("2min30s", 150), ("1h", 3600),
    ("500ms", 0.5), ("infinity", math.inf)])
def test_systemd_time_spans_are_read_as_systemd_reads_them(text, seconds):
    assert units.parse_seconds(text) == seconds


@pytest.mark.parametrize("text, size", [
    ("1G", 1 << 30), ("768M", 768 << 20), ("1073741824", 1 << 30), ("infinity", math.inf)])
def test_systemd_memory_sizes_are_read_as_systemd_reads_them(text, size):
    assert units.parse_bytes(text) == size
