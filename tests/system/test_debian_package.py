"""The Debian package in a booted Debian 12 and 13, under a real systemd
(tests/system/e2e-nspawn does the work; this runs it for each release).

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


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_the_package_installs_runs_upgrades_and_purges_under_systemd(release):
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the package test {reason}")
        pytest.skip(reason)
    result = subprocess.run([os.path.join(HERE, "e2e-nspawn"), release], capture_output=True,
                            text=True, timeout=1200)
    print(result.stdout[-6000:], result.stderr[-4000:])
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.rstrip().endswith(f"== PASS: {release}")
