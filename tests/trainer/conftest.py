"""Trainer test fixtures: one torch thread, a small data file, the tiny base loaded once per module."""

from pathlib import Path

import pytest
from loraplex.trainer.demo_tasks import DATA_DIR, TASKS

SENTIMENT = dict(
    prompt_template=TASKS["sentiment"]["prompt"], completion_template=TASKS["sentiment"]["completion"]
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train as fast on one thread, and far faster when other processes share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """The first 60 sentiment records: enough for a few real optimizer steps."""
    path = tmp_path_factory.mktemp("data") / "sentiment60.jsonl"
    path.write_text("".join((DATA_DIR / "sentiment.jsonl").read_text().splitlines(keepends=True)[:60]))
    return path


@pytest.fixture(scope="module")
def loaded_base(tiny_base):
    from loraplex.trainer.base_model import load_base_model

    return load_base_model(tiny_base)
