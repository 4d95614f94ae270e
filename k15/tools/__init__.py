"""Side programs, each a `python -m k15.tools.<name>` entry: the pod
planner (`plan`), benchmarks (`bench`), prompt-set curation (`curate`) and
reward-model training (`train_rm`)."""
