"""Benchmarks: `python -m k15.tools.bench NAME [flags]`, one module per NAME."""
