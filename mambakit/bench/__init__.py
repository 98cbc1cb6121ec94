"""Benchmarks with logic worth testing: generation speed against a same-size transformer (`generation`),
decoding and training against upstream mamba-ssm in child processes (`decode`, `training`, sharing
`variants`; loaded by path by their scripts)."""
