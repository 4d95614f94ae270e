"""Stages of a run, each one module over the template in `common`.

`k15.pipeline.STAGES` lists them by name (the names `config.stages` takes).
"""
