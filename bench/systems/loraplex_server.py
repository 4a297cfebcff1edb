"""System 1: loraplex end to end, `loraplex serve` in a subprocess, driven over gRPC.

The bench talks to the server through the generated `loraplex.v1` stubs (the public gRPC
contract), one channel per client thread, so what is measured is what any gRPC client sees:
serialization, the server's queue and scheduler, and the engine. A server that cannot start
(engine not built yet, say) raises `Unavailable` with the reason, and the bench reports that
system as "not available".
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.measure.results import Prompt, RequestResult

log = logging.getLogger("bench.loraplex")


class Unavailable(RuntimeError):
    """This system cannot run here; the message says why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_grpc():
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
    except ImportError as exc:
        raise Unavailable(f"the loraplex.v1 gRPC stubs are not importable ({exc})") from exc
    return grpc, health_pb2, health_pb2_grpc, generation_pb2, generation_pb2_grpc, adapters_pb2, adapters_pb2_grpc


class LoraplexServer:
    """One `loraplex serve` process and a gRPC client for it."""

    def __init__(
        self,
        package: Path,
        engine: str,
        *,
        adapter_root: Path | None = None,
        log_dir: Path,
        start_timeout_s: float = 600.0,
        max_batch: int = 16,
        extra_args: tuple[str, ...] = (),
        label: str = "",
        poll_s: float = 0.25,
        launcher: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        (self.grpc, self._health_pb2, self._health_grpc, self.gen_pb2, self._gen_grpc, self.adm_pb2,
         self._adm_grpc) = _import_grpc()
        self.engine = engine
        self._channels: dict[int, tuple] = {}  # client index -> (channel, generation stub, adapters stub)
        self._lock = threading.Lock()
        self.name = f"loraplex[{engine}]{' ' + label if label else ''}"
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"server_{engine}_{package.name}_{self.port}.log"
        # `launcher`: the Python that runs the server (default: this one), e.g. an emulated arm64 one
        cmd = [*(launcher or (sys.executable,)), "-m", "loraplex.runtime.app.cli", "serve", "--package", str(package),
               "--host", "127.0.0.1", "--port", str(self.port), "--engine", engine,
               "--max-batch", str(max_batch), "--max-queue", "1024", *extra_args]
        if adapter_root is not None:
            cmd += ["--adapter-root", str(adapter_root)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        log.info("starting %s: %s", self.name, " ".join(cmd))
        self.started_at = time.perf_counter()  # process start (cold-start measurements count from here)
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.start_s = 0.0
        self._poll_s = poll_s
        try:
            self._wait_serving(start_timeout_s)
        except Exception:
            self.close()
            raise
        self._ignore_eos = "ignore_eos" in self.gen_pb2.SamplingParams.DESCRIPTOR.fields_by_name
        if not self._ignore_eos:
            log.warning("SamplingParams has no ignore_eos: %s requests may end early at EOS", self.name)


    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_serving(self, timeout_s: float) -> None:
        """Health polled every `poll_s` on a new channel each time, with a subchannel of its own: a
        connection refused (the port not open yet) puts the subchannel in gRPC's reconnect backoff (1 s),
        and channels to one target share subchannels by default, which would add up to a second to a cold
        start measured against peers polled over HTTP."""
        start = time.perf_counter()
        serving = self._health_pb2.HealthCheckResponse.SERVING
        while time.perf_counter() - start < timeout_s:
            if self.process.poll() is not None:
                raise Unavailable(
                    f"`loraplex serve --engine {self.engine}` exited with "
                    f"{self.process.returncode}:\n{self._log_tail()}"
                )
            channel = self.grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                reply = self._health_grpc.HealthStub(channel).Check(
                    self._health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == serving:
                    self.start_s = time.perf_counter() - start
                    return
            except self.grpc.RpcError:
                pass
            finally:
                channel.close()
            time.sleep(self._poll_s)
        raise Unavailable(f"{self.name} was not SERVING after {timeout_s:.0f} s:\n{self._log_tail()}")

    # --- clients -----------------------------------------------------------------------------

    def _stubs(self, client: int = 0):
        """Stubs on client `client`'s own channel, made once per server and reused by every scenario."""
        with self._lock:
            if client not in self._channels:
                channel = self.grpc.insecure_channel(self.target)
                self._channels[client] = (
                    channel,
                    self._gen_grpc.GenerationStub(channel),
                    self._adm_grpc.AdaptersStub(channel),
                )
            _, generation, adapters = self._channels[client]
        return generation, adapters

    def _request(self, prompt: Prompt, adapter: str | None, new_tokens: int):
        params = dict(max_new_tokens=new_tokens, temperature=0.0)
        if self._ignore_eos:  # every request does the same work: no EOS, and no adapter's output contract
            params.update(ignore_eos=True, no_default_output=True)  # (a label task's would end at the label)
        return self.gen_pb2.GenerateRequest(
            adapter=adapter or "",
            prompt=prompt.text,
            params=self.gen_pb2.SamplingParams(**params),
            request_id=uuid.uuid4().hex,
        )

    def generate(self, prompt: Prompt, adapter: str | None, new_tokens: int) -> RequestResult:
        """One streamed request: client-side time to first token and total latency."""
        generation, _ = self._stubs()
        start = time.perf_counter()
        ttft = None
        server_total = None
        ids: list[int] = []
        try:
            for chunk in generation.GenerateStream(self._request(prompt, adapter, new_tokens), timeout=600):
                if chunk.token_ids:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    ids.extend(chunk.token_ids)
                if chunk.HasField("timings") and chunk.timings.total_ms:
                    server_total = chunk.timings.total_ms / 1000
        except self.grpc.RpcError as exc:
            return RequestResult(time.perf_counter() - start, ttft, len(ids), ok=False, error=str(exc.code()))
        return RequestResult(latency_s=time.perf_counter() - start, ttft_s=ttft, tokens=len(ids), token_ids=ids,
                             server_total_s=server_total)

    def complete_task(self, adapter: str, inputs: dict[str, str], max_new_tokens: int) -> tuple[str, bool]:
        """A task request (the adapter's template renders `inputs`), greedy, stopping at EOS:
        (text, finished at EOS or where the adapter's output contract completed (STOP))."""
        generation, _ = self._stubs()
        request = self.gen_pb2.GenerateRequest(
            adapter=adapter, inputs=self.gen_pb2.TaskInputs(fields=inputs), request_id=uuid.uuid4().hex,
            params=self.gen_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        reply = generation.Generate(request, timeout=600)
        return reply.text, reply.finish_reason in (self.gen_pb2.EOS, self.gen_pb2.STOP)

    def generate_unary(self, prompt: Prompt, adapter: str | None, new_tokens: int, client: int = 0) -> RequestResult:
        generation, _ = self._stubs(client)
        start = time.perf_counter()
        try:
            reply = generation.Generate(self._request(prompt, adapter, new_tokens), timeout=600)
        except self.grpc.RpcError as exc:
            return RequestResult(time.perf_counter() - start, None, 0, ok=False, error=str(exc.code()))
        timed = reply.HasField("timings")
        return RequestResult(
            latency_s=time.perf_counter() - start,
            ttft_s=reply.timings.time_to_first_token_ms / 1000 if timed else None,
            tokens=reply.usage.completion_tokens,
            server_total_s=reply.timings.total_ms / 1000 if timed and reply.timings.total_ms else None,
        )

    def run_load(
        self,
        requests: list[tuple[Prompt, str | None]],
        clients: int,
        new_tokens: int,
        until: threading.Event | None = None,
    ) -> tuple[list[RequestResult], float, str]:
        """`clients` closed-loop client threads share the request list (each sends its next when one returns).

        With `until`, clients cycle through the list until the event is set (and at least once through it).
        """
        counter = itertools.count()
        results: dict[int, RequestResult] = {}
        start = time.perf_counter()

        def more(i: int) -> bool:
            return i < len(requests) or (until is not None and not until.is_set())

        def client(c: int) -> None:
            while more(i := next(counter)):
                sent = time.perf_counter() - start
                result = self.generate_unary(*requests[i % len(requests)], new_tokens, client=c)
                result.start_s = sent
                results[i] = result

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return [results[i] for i in sorted(results)], wall, "one gRPC channel per client, closed loop"

    def load_adapter(self, name: str, path: Path) -> float:
        """`Adapters.Load` (path relative to the adapter root); returns its latency in seconds."""
        _, adapters = self._stubs(-1)  # an admin channel of its own
        start = time.perf_counter()
        adapters.Load(self.adm_pb2.LoadAdapterRequest(name=name, path=str(path)), timeout=300)
        return time.perf_counter() - start

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children."""
        import psutil

        proc = psutil.Process(self.process.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def close(self) -> None:
        for channel, _, _ in self._channels.values():
            channel.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
