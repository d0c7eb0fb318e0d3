"""The side-by-side benchmark, as a package: `python -m bench.run` (`bench/run` installs the tools first).

Layout, one concern per module: `settings` (sizes and addresses), `processes` and `accounting` (the processes
a run starts, their CPU and memory from /proc), `tools`, `isolation` (the local topology's own netns),
`topology` (where the paths run: loopback or the netns lab), `paths` (one module per measured path and the
registry of them), `steps` (the measurements), `scaling`, `session` (one run), `record`, `report` (the
table), `dryrun` and `run` (the command line). `loadgen.py` is also run as a script, inside pods.
"""
