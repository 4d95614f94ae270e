"""Side programs, each a `python -m k15.tools.<name>` entry: the pod
planner (`plan`), benchmarks (`bench`)."""
