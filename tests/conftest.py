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
    "tests.fixtures.serving",
    "tests.fixtures.tls",
]
