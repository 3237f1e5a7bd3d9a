"""Benchmarks: `python -m benchmarks list`, `python -m benchmarks run NAME [key=value ...]` (see harness.py)."""
