"""Stage progress and timings for long exports: one progress bar over the stages, seconds per stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    """`with timer.stage("build graph"): ...` advances one bar and records the stage's seconds."""

    def __init__(self, total: int, *, enabled: bool = True, description: str = "export") -> None:
        from tqdm.auto import tqdm

        self.timings: dict[str, float] = {}
        # disable=None: shown on a terminal only (piped output gets no carriage-return updates).
        self._bar = tqdm(total=total, desc=description, unit="stage", disable=None if enabled else True, leave=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - start
            self._bar.update(1)

    def close(self) -> None:
        self._bar.set_postfix_str("done")
        self._bar.close()
