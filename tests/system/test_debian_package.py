"""The Debian package in a booted Debian 12 and 13, under a real systemd
(tests/system/e2e-nspawn, install-order and worker-host do the work; this
runs them for each release; auth-upgrade, the upgrade from 0.1.0, on 13).

Needs root, systemd-nspawn and a network that reaches Debian's mirror (to
build the container's root): it skips on a laptop without them and FAILS
under CI=true.
"""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _unavailable():
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/etc/debian_version"):
        return "needs a Debian machine"
    if shutil.which("apt-get") is None:
        return "needs apt-get"
    return None


def _run(script, release, timeout):
    """Run a script of this folder for release; it must end with its PASS line."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the package test {reason}")
        pytest.skip(reason)
    result = subprocess.run([os.path.join(HERE, script), release], capture_output=True,
                            text=True, timeout=timeout)
    print(result.stdout[-6000:], result.stderr[-4000:])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout.rstrip()


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_the_package_installs_runs_upgrades_and_purges_under_systemd(release):
    assert _run("e2e-nspawn", release, 1200).endswith(f"== PASS: {release}")


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_the_stack_comes_up_whatever_order_apt_configures_the_packages_in(release):
    output = _run("install-order", release, 900)
    for variant in ("preinstalled", "broker-first", "later"):
        assert f"== PASS: {variant} ({release})" in output


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_a_worker_only_host_renders_jobs_from_another_hosts_api_over_a_cluster(release):
    assert _run("worker-host", release, 900).endswith(f"== PASS: worker-host ({release})")


def test_the_container_roots_build_from_an_empty_or_stale_cache():
    # What a new user's machine has: no /var/cache/imgworker-roots at all.
    assert _run("roots-cache", "bookworm", 900).endswith("== PASS: roots-cache (bookworm)")


def test_auth_upgrade_from_0_1_keeps_taking_uploads_without_credentials_and_says_so():
    # One release: the upgrade path is the package's, not the release's, and
    # each run builds two .debs and a container (CI time).
    assert _run("auth-upgrade", "trixie", 900).endswith("== PASS: auth-upgrade (trixie)")
