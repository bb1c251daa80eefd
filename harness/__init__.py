"""What the tests, the benchmarks and script/ share, kept out of tests/ so
each may import it: sample images made on the spot (samples), real
pipelines of processes on this machine (pipeline), the Jepsen-style ledger
of accepted jobs (ledger) and the poison-job killer (crash_on_poison); the
last two also run inside the booted test containers, on the standard
library, Pillow and the installed imgworker alone. Not part of the package.
"""
