"""Benchmarks of loraplex against the peers a user would run instead.

Run from the repository root: `python -m bench.run` (full) or `python -m bench.run --quick`.
Not installed as a package and not run by CI. Subpackages, by part:
`measure` (per-request results, statistics, machine, roofline), `workloads` (what is built and
served), `systems` (loraplex and its peers behind one interface), `random_init` and `edge` (the two
parts of `bench.run`), `report` (RESULTS.md and plots), `features` (standalone measurements of
one loraplex feature: Ray Serve, HTTP vs gRPC, output constraints).
"""
