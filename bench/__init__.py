"""Benchmarks at MIMIC-CXR scale (`make bench` runs `python -m bench.run`); figures go to bench/RESULTS.md."""
