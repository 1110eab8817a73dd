"""Benchmarks: kernel timings against baselines and the hardware floor."""
