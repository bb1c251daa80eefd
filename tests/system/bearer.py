"""Runs ``python3 -m MODULE ARGS...`` with an API key on every HTTP request
that urllib makes through its default opener: ``Authorization: Bearer <the
key in KEYFILE>``. Standard library only; copied into the booted container
by tests/system/e2e-nspawn, where a fresh install requires credentials:

    python3 bearer.py /root/imgworker.key harness.ledger load --state ...

(urllib's OpenerDirector adds its ``addheaders`` to each request that does
not set them itself.)
"""

import os
import runpy
import sys
import urllib.request


def main():
    keyfile, module, *args = sys.argv[1:]
    with open(keyfile) as f:
        key = f.read().strip()
    opener = urllib.request.build_opener()
    opener.addheaders.append(("Authorization", f"Bearer {key}"))
    urllib.request.install_opener(opener)
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()      # as python3 -m has it: the module from here
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
