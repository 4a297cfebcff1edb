"""Benchmarks of loraplex against the peers a user would run instead (issue 5).

Run from the repository root: `python -m bench.run` (full) or `python -m bench.run --quick`.
Not installed as a package and not run by CI.
"""
