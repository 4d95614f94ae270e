"""Side programs, each with its own `python -m k15.tools.<name>` entry."""
