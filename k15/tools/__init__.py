"""Side programs, each a `python -m k15.tools.<name>` entry: the pod
planner (`plan`), benchmarks (`bench`), prompt-set curation (`curate`),
reward-model training (`train_rm`), data files (`make_data`), rejection
sampling (`rejection_sample`), HF export (`export`), long2short
(`long2short`) and a stage's failures per task and level (`probe`)."""
