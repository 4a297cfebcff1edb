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


# Test tiers, registered as markers in pyproject.toml and applied here, so no test needs to name its tier.
# `make test` runs every tier; `make test-runtime` runs what needs none of them (the runtime's own
# dependencies and the recipe package): `-m "not torch and not real_model and not cluster and not soak"`.
TORCH_FIXTURES = frozenset({  # each builds models or packages with torch, transformers, peft and Olive
    "tiny_base", "tiny_base_factory", "random_adapter_factory", "tiny_package", "package_factory",
    "demo_training", "demo_adapters", "smollm2_base", "real_packages",
})
REAL_MODEL_FIXTURES = frozenset({"smollm2_base", "real_packages"})
TORCH_PATHS = ("tests/trainer/", "tests/adapters/")  # training and export stages: their extras, fixture or not
PATH_TIERS = {
    "real_model": ("tests/e2e/test_real_model.py",),
    "cluster": ("tests/cluster/",),
    "soak": ("tests/runtime/test_soak.py", "tests/runtime/test_fuzz.py"),
}


def _named_fixtures(item) -> set[str]:
    """The fixtures an item requests, also those its body fetches by name (`request.getfixturevalue`)."""
    names = set(getattr(item, "fixturenames", ()))
    code = getattr(getattr(item, "function", None), "__code__", None)
    if code is not None and "getfixturevalue" in code.co_names:
        import inspect

        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        names |= {name for name in TORCH_FIXTURES if f'"{name}"' in source or f"'{name}'" in source}
    return names


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.relative_to(config.rootpath).as_posix()
        fixtures = _named_fixtures(item)
        tiers = {tier for tier, prefixes in PATH_TIERS.items() if path.startswith(prefixes)}
        if fixtures & REAL_MODEL_FIXTURES:
            tiers.add("real_model")
        if fixtures & TORCH_FIXTURES or path.startswith(TORCH_PATHS):
            tiers.add("torch")
        for tier in sorted(tiers):
            item.add_marker(tier)


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
