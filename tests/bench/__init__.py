"""On-demand benchmarks: `make bench` runs every module here (tests/bench/run_all.py). pytest never collects
them: none is named test_*.py."""
