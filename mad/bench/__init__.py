"""Benchmarks: `mad bench`."""
