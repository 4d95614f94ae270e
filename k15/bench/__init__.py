"""`python -m k15.bench NAME` is an alias of `python -m k15.tools.bench NAME`
(the benchmarks live in k15/tools/bench/)."""
