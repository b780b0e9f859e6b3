"""Benchmarks: they print figures and never fail on time."""
