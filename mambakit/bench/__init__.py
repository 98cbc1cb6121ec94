"""Benchmarks with logic worth testing: generation speed against a same-size transformer (`generation`)."""
