"""Development support shared by the tests, the benchmarks and the demo: never shipped.

Why a package of its own: `scripts/demo.py` and `bench/` need the same real services the test
suite starts (PostgreSQL and WsgiDAV as local processes, `services`), the same generated media
(`media`), the controller run as a subprocess (`controller_helpers`) and, on the KWOK test
cluster, the runner's final commit played for simulated pods (`simulated_runner`, driven by
the pod annotations in `kwok`). Importing them from `tests/` made the demo and the benchmarks
depend on the test suite; here they depend on this harness, and `tests/` keeps only tests,
fixtures and pytest plugins.

Not part of the distribution: pyproject.toml packages `controller`, `jobrunner` and
`dharma_common` only, and .dockerignore keeps this directory out of the images.
"""
