"""Session-wide fixtures: each stage's built artefacts are made once and shared.

Fixture modules mirror the pipeline: base model -> trained adapters -> package -> server.
"""

import os

# No model hub, no telemetry, ever: tests build everything they use.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.base",
    "tests.fixtures.training",
    "tests.fixtures.packages",
    "tests.fixtures.recipe_package",
    "tests.fixtures.serving",
    "tests.fixtures.real",
    "tests.fixtures.tls",
    "tests.fixtures.http",
]


# CI runs a bounded soak and fuzz (minutes, not hours); `make soak` passes larger figures.
SOAK_REQUESTS = 1500
FUZZ_EXAMPLES = 120


def pytest_addoption(parser):
    group = parser.getgroup("loraplex", "soak and fuzz of the server")
    group.addoption("--soak-requests", type=int, default=SOAK_REQUESTS, help="requests per engine in the soak")
    group.addoption("--fuzz-examples", type=int, default=FUZZ_EXAMPLES,
                    help="Hypothesis examples per fuzz test (and a random seed instead of a fixed one)")


def pytest_configure(config):
    """The fuzz's Hypothesis profile: CI draws a fixed set (reproducible), `make soak` draws at random."""
    from hypothesis import HealthCheck, settings

    examples = config.getoption("fuzz_examples")
    settings.register_profile(
        "loraplex", max_examples=examples, derandomize=examples == FUZZ_EXAMPLES, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.load_profile("loraplex")


def pytest_terminal_summary(terminalreporter):
    from tests.fixtures.soak import FUZZ_CODES, REPORTS

    for report in REPORTS:
        terminalreporter.write_line(report.summary())
    for engine, codes in sorted(FUZZ_CODES.items()):
        terminalreporter.write_line(f"fuzz[{engine}]: {sum(codes.values())} calls, codes {dict(codes.most_common())}")
