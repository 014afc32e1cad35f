"""Benchmarks (measurements, never assertions). `python -m jaxvlm.bench.decode` times the sampler."""
