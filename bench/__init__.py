"""imgworker's benchmarks: renditions per core, ingest, end to end, memory.

Each figure is measured beside a baseline in the same run and reported with
the ratio between them, so a slower or busier machine moves both. Run with
script/bench (it installs what the benchmarks need); results go to
bench/results/. These are not tests: CI never times anything, it only runs
``python3 -m bench --smoke`` (tiny sizes, seconds) so the code cannot rot.
"""
