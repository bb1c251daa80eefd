import os
import subprocess
import sys

import pytest

from imgworker import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    return str(path)


def test_the_defaults_are_a_working_config_with_three_renditions():
    loaded = config.from_dict({})
    assert loaded.broker.prefetch == 2
    assert loaded.storage.root == "/var/lib/imgworker"
    assert [(r.name, r.width, r.height, r.mode, r.format, r.quality) for r in loaded.renditions] == [
        ("large", 1600, 1600, "fit", "jpeg", 85),
        ("medium", 800, 800, "fit", "jpeg", 85),
        ("thumb", 200, 200, "fill", "jpeg", 80),
    ]


def test_a_file_sets_typed_values_and_keeps_percent_signs_in_the_broker_url(tmp_path):
    path = write(tmp_path, "[broker]\nurl = amqp://u:p%%w@h:5672/%2F\nprefetch = 4\n"
                           "[api]\nformats = jpeg, png\n")
    loaded = config.load(path)
    assert loaded.path == path
    assert loaded.broker.url == "amqp://u:p%%w@h:5672/%2F"
    assert loaded.broker.prefetch == 4
    assert loaded.api.formats == ("jpeg", "png")


def test_a_renditions_section_replaces_the_default_set(tmp_path):
    path = write(tmp_path, "[renditions]\nsquare = 300x300 fill webp 70\n")
    (only,) = config.load(path).renditions
    assert (only.name, only.width, only.mode, only.format, only.extension) == \
        ("square", 300, "fill", "webp", "webp")


@pytest.mark.parametrize("text, expected", [
    ("[broker]\nprefetch = zero\n", "[broker] prefetch = 'zero'"),
    ("[broker]\nprefetch = 0\n", "[broker] prefetch = '0': must be a whole number of at least 1"),
    ("[broker]\nurl = http://x/\n", "[broker] url = 'http://x/': must be an amqp://"),
    ("[storage]\nroot = relative/dir\n", "[storage] root = 'relative/dir': must be an absolute path"),
    ("[api]\nlisten = 8000\n", "[api] listen = '8000': must be HOST:PORT"),
    ("[api]\nformats = jpeg, tiff\n", "[api] formats = 'jpeg, tiff'"),
    ("[renditions]\nbig = 1600 fit jpeg 85\n", "[renditions] big = '1600 fit jpeg 85': must be WIDTHxHEIGHT"),
    ("[renditions]\nbig = 1600x1600 stretch jpeg 85\n", "MODE must be one of fit, fill"),
    ("[renditions]\nbig = 1600x1600 fit gif 85\n", "FORMAT must be one of jpeg, png, webp"),
    ("[renditions]\nbig = 1600x1600 fit jpeg 101\n", "QUALITY must be between 1 and 100"),
    ("[broker]\nprefetchh = 2\n", "[broker] unknown option 'prefetchh'"),
    ("[brokers]\nurl = amqp://h/\n", "unknown section [brokers]"),
])
def test_a_bad_config_names_the_file_section_option_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value).startswith(path + ": ")
    assert expected in str(error.value)


def test_an_explicitly_named_missing_file_is_an_error_but_a_missing_default_is_not(tmp_path, monkeypatch):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "absent.ini"))
    monkeypatch.delenv("IMGWORKER_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.ini"))
    assert config.load().path is None


def test_the_shipped_config_file_is_the_template_and_loads_to_the_defaults():
    shipped = os.path.join(REPO, "etc", "imgworker", "config.ini")
    with open(shipped) as handle:
        assert handle.read() == config.template(), \
            "regenerate with: imgworker check-config --template > etc/imgworker/config.ini"
    loaded = config.load(shipped)
    assert loaded.renditions == config.from_dict({}).renditions
    for section, options in config.SCHEMA.items():
        for option in options:
            assert f"#{option} =" in config.template()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "imgworker", *args], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_check_config_exits_78_and_says_what_is_wrong(tmp_path):
    path = write(tmp_path, "[worker]\nmax_attempts = -1\n")
    result = run_cli("check-config", env={"IMGWORKER_CONFIG": path})
    assert result.returncode == 78
    assert f"{path}: [worker] max_attempts = '-1'" in result.stderr


@pytest.mark.parametrize("value, expected", [
    ("1600x1600 fit bmp 85", "FORMAT must be one of jpeg, png, webp"),
    ("1600x1600 fit gif 85", "FORMAT must be one of jpeg, png, webp"),
    ("1600x1600 stretch jpeg 85", "MODE must be one of fit, fill"),
])
def test_check_config_refuses_a_rendition_format_or_mode_imgworker_cannot_make(tmp_path, value,
                                                                                expected):
    path = write(tmp_path, f"[renditions]\nbig = {value}\n")
    result = run_cli("check-config", env={"IMGWORKER_CONFIG": path})
    assert result.returncode == 78
    assert f"{path}: [renditions] big = {value!r}: {expected}" in result.stderr


def test_check_config_accepts_a_good_file_given_with_the_flag(tmp_path):
    path = write(tmp_path, "[broker]\nurl = amqp://guest:guest@127.0.0.1:5672/%2F\n"
                           "[api]\nlisten = 127.0.0.1:9000\n")
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK")
    assert "; metrics: /run/imgworker/metrics;" in result.stdout


def test_check_config_names_the_metrics_directory_and_what_moving_it_takes(tmp_path):
    path = write(tmp_path, "[broker]\nurl = amqp://guest:guest@127.0.0.1:5672/%2F\n"
                           f"[storage]\nmetrics_dir = {tmp_path}/metrics\n")
    result = run_cli("check-config", env={"IMGWORKER_CONFIG": path})
    assert result.returncode == 0, result.stderr
    assert f"; metrics: {tmp_path}/metrics;" in result.stdout
    assert f"[storage] metrics_dir is {tmp_path}/metrics" in result.stderr
    assert "ReadWritePaths=" in result.stderr


@pytest.mark.parametrize("command", ["check-config", "api", "worker", "sweep"])
def test_without_a_broker_url_every_broker_role_exits_78_and_names_the_fix(tmp_path, command):
    # Given the shipped config.ini alone: no default URL, so never guest by accident
    path = tmp_path / "config.ini"
    path.write_text(config.template())
    # When a role that needs the broker starts
    result = run_cli("--config", str(path), command)
    # Then it refuses with EX_CONFIG (the units do not restart it) and says how to fix it
    assert result.returncode == 78
    assert "no broker configured" in result.stderr
    assert "imgworker setup-broker" in result.stderr
    assert "config.d/broker.ini" in result.stderr
    assert config.load(str(path)).broker.url == ""


def test_every_command_explains_itself_with_help():
    for command in ("api", "worker", "check-config", "setup-broker", "submit", "sweep"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert "usage: imgworker" in result.stdout
    assert "--instance" in run_cli("worker", "--help").stdout
    assert "--wait" in run_cli("submit", "--help").stdout


def test_drop_ins_in_config_d_override_the_file_in_name_order_and_errors_name_the_drop_in(tmp_path):
    path = write(tmp_path, "[broker]\nurl = amqp://a/\nprefetch = 2\n")
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "broker.ini").write_text("[broker]\nurl = amqp://imgworker:s3cret@b/iw\n")
    (tmp_path / "config.d" / "zz-local.ini").write_text("[broker]\nprefetch = 3\n")
    (tmp_path / "config.d" / "notes.txt").write_text("not read")
    loaded = config.load(path)
    assert (loaded.broker.url, loaded.broker.prefetch) == ("amqp://imgworker:s3cret@b/iw", 3)
    (tmp_path / "config.d" / "zz-local.ini").write_text("[broker]\nprefetch = many\n")
    with pytest.raises(config.ConfigError) as error:
        config.load(path)
    assert str(error.value).startswith(str(tmp_path / "config.d" / "zz-local.ini") +
                                       ": [broker] prefetch = 'many'")


def test_several_broker_urls_are_one_option_if_they_share_user_password_and_vhost():
    loaded = config.from_dict({"broker": {"url": " amqp://iw:pw@n1:5672/iw,amqp://iw:pw@n2:5673/iw ,"}})
    assert loaded.broker.url == "amqp://iw:pw@n1:5672/iw, amqp://iw:pw@n2:5673/iw"
    assert config.split_urls(loaded.broker.url) == ["amqp://iw:pw@n1:5672/iw",
                                                    "amqp://iw:pw@n2:5673/iw"]
    for mixed in ("amqp://iw:pw@n1/iw, amqp://iw:other@n2/iw", "amqp://iw:pw@n1/a, amqp://iw:pw@n2/b"):
        with pytest.raises(config.ConfigError, match="must all name the same user, password and vhost"):
            config.from_dict({"broker": {"url": mixed}})
    with pytest.raises(config.ConfigError, match="or several, separated by commas"):
        config.from_dict({"broker": {"url": "amqp://iw:pw@n1/iw, http://n2/"}})
