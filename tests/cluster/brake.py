"""A brake for the cluster's requests, worked from the test process: `ClusterBrake.held()` keeps every
request that reaches an engine replica from entering its engine until the block ends.

Replicas run in Ray actors (other processes), so the brake is a file: while it exists, each replica
keeps the jobs submitted to it waiting in front of its engine (admitted, holding their adapter
lease, counted in flight, as a queued request is) and submits them once the file is gone. A job
stopped meanwhile (cancel, deadline) still reaches the engine, which ends it at once. The hold is
before the engine, so it does not depend on how engines deliver tokens.

`BrakedReplica` is the engine deployment's class in the tests (`deploy(..., replica_class=...)`);
it reads the brake's path from its environment (`BRAKE_ENV`, set through the replicas' runtime_env).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraplex.runtime.cluster.replica import EngineReplica

BRAKE_ENV = "LORAPLEX_TEST_CLUSTER_BRAKE"
POLL_S = 0.01  # how often a held job looks at the brake (only the release's latency: nothing races it)

log = logging.getLogger(__name__)


class ClusterBrake:
    """The test side: the file's presence is the brake."""

    def __init__(self, path: Path):
        self.path = path

    def runtime_env(self) -> dict[str, Any]:
        """The engine replicas' `ray_actor_options` that point them at this brake."""
        return {"runtime_env": {"env_vars": {BRAKE_ENV: str(self.path)}}}

    def hold(self) -> None:
        self.path.touch()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def held(self) -> Iterator[ClusterBrake]:
        """Hold for the block; released at its end, whatever happens (later tests find it open)."""
        self.hold()
        try:
            yield self
        finally:
            self.release()


class GatedEngine:
    """The engine as the request layer sees it: `submit` waits, off the caller, while the brake is held."""

    def __init__(self, engine: Any, gate: Path):
        self._engine, self._gate = engine, gate
        self._waiting: set[asyncio.Task] = set()

    def submit(self, job: Any) -> None:
        if not self._gate.exists():
            self._engine.submit(job)
            return
        task = asyncio.get_running_loop().create_task(self._submit_when_released(job))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)

    async def _submit_when_released(self, job: Any) -> None:
        while self._gate.exists():
            await asyncio.sleep(POLL_S)
        try:
            self._engine.submit(job)
        except Exception:  # the tests send jobs the engine takes; one it refused would never finish
            log.exception("braked job %s refused by the engine after the release", job.request_id)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class BrakedReplica(EngineReplica):
    """An engine replica whose request layer submits through `GatedEngine` (after its warm-up)."""

    async def __init__(self, config: Any, catalog: Any, slots: int):
        await super().__init__(config, catalog, slots)
        service = self.core.service
        service.engine = GatedEngine(service.engine, Path(os.environ[BRAKE_ENV]))
