"""The differential fuzzer of the data path's parsers (issue 13): frames
(frames.py), what docs/datapath.md says must happen to them (oracle.py),
and the runner that compares the programs with it (runner.py).

    PYTHONPATH=tests .venv/bin/python -m fuzz --cases 1000000   # as root

tests/fuzz/test_fuzz.py runs a fixed seed in CI.
"""
