"""Benchmarks: `python -m k15.bench NAME [flags]`, one module per NAME."""
