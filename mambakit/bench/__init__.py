"""Benchmarks with logic worth testing: generation speed against a same-size transformer (`generation`),
decoding, training and the SSD scan against upstream mamba-ssm in child processes (`decode`, `training`,
`ssd`, sharing `variants`), and every model-level figure in one JSON (`model`, running decode's and
training's children); those are loaded by path by their scripts."""
