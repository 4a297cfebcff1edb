"""The application: the `loraplex` command line for every stage, and the demos.

Built on the libraries (`loraplex.trainer`, `loraplex.adapters`, the serving primitives of
`loraplex.runtime`); nothing in those imports it.
"""
