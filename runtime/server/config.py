"""What a server runs: `ServerConfig` (+ `ServerTLS`), importable without the gRPC server stack.

`loraplex serve` builds the configuration and starts loading the model (`loading`) before it imports
grpc, the servicers and Prometheus: the session is made while they import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.runtime.engines import resolve_engine
from loraplex.runtime.engines.base import SPECULATION_MODES
from loraplex.runtime.server.profiles import get_profile

if TYPE_CHECKING:
    import grpc
    from loraplex.runtime.server.adapter_store import AdapterSource
    from loraplex.runtime.server.auth import AuthScope

MIB = 1 << 20
BYTES_PER_CONTEXT_TOKEN = 16  # a prompt longer than this per context token cannot fit the context anyway


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the gRPC port and the metrics endpoint; with `client_ca`, mutual TLS: every client
    must present a certificate signed by that CA (a client without one is refused at the handshake)."""

    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key of the server
    client_ca: Path | None = None  # PEM CA bundle client certificates must chain to (mutual TLS)

    def __post_init__(self) -> None:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{what} {path} is not a file: give a PEM file")
        self._check_pem()

    def _check_pem(self) -> None:
        """Each file holds what it should, and the key is the certificate's: gRPC's own failure says only
        'Failed to bind to address'."""
        import ssl

        for what, path, marker in (("--tls-cert", self.cert, "CERTIFICATE-----"),
                                   ("--tls-key", self.key, "PRIVATE KEY-----"),
                                   ("--tls-client-ca", self.client_ca, "CERTIFICATE-----")):
            if path is not None and marker not in Path(path).read_text(errors="replace"):
                raise ValueError(f"{what} {path} holds no PEM {marker.rstrip('-').lower()}: give a PEM file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-key {self.key} is not the private key of --tls-cert {self.cert} (or one of "
                             f"them cannot be read: {exc.reason or exc})") from None

    def credentials(self) -> grpc.ServerCredentials:
        import grpc

        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass
class ServerConfig:
    package: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (RunningServer.port tells which)
    device: str = "cpu"  # cpu | gpu | npu
    provider: str | None = None  # cuda | dml | qnn | openvino | webgpu (default: per device)
    engine: str = "auto"  # auto | batched | genai; __post_init__ resolves auto (batched on cpu)
    # Presets for the options left None below (see `profiles`): "default" or "edge".
    profile: str = "default"
    max_batch: int | None = None  # requests decoding at once (default 8; edge 4)
    max_queue: int | None = None  # requests waiting beyond max_batch before RESOURCE_EXHAUSTED (64; edge 16)
    max_slots: int | None = None  # batched engine: adapters resident in the weight bank (None = max_batch)
    intra_op_threads: int | None = None  # batched engine: onnxruntime threads (0 = one per physical core)
    # Batched engine: onnxruntime's idle threads busy-wait, None: briefly (the profile's `spin_us`, 20 us),
    # True: as long as onnxruntime likes (`--spin`), False: not at all (`--no-spin`).
    allow_spinning: bool | None = None
    # With spinning, microseconds an idle thread spins (None: the profile's if spinning is left to it, else
    # onnxruntime's own).
    spin_us: int | None = None
    memory_arena: bool | None = None  # batched engine: onnxruntime's CPU arena (default on; edge off)
    warm_adapters: bool | None = None  # warm every adapter at start, else the base only (default yes; edge no)
    malloc_arenas: int | None = None  # glibc malloc arenas, set at start (0: glibc's default; edge 1)
    session_cache: bool = True  # batched engine: optimized session + prepacked weights cached per machine
    # Batched engine: MiB for the KV of prompt prefixes kept across requests (per adapter version's weights;
    # 0 = off, None = 64). The genai engine has no prefix cache: a value given there is ignored (logged).
    prefix_cache_mib: float | None = None
    # Batched engine: speculative decoding, drafts verified in the decode step (`on`: prompt lookup and
    # the output contract where they pay; `auto`: the same on fp32 packages, off on quantized ones, whose
    # multi-token steps round otherwise; `lookup`, `contract`: one source; `off`). The genai engine has none.
    speculation: str = "auto"
    adapter_root: Path | None = None  # Load paths resolve under it (default: the package's adapters/)
    # Where a request's adapter that is not loaded is found on first use (directories, or any
    # `AdapterSource`); with any, the package's own adapters/ is the first store. Empty: none.
    adapter_stores: Sequence[Path | str | AdapterSource] = ()
    pin: Sequence[str] = ()  # adapter names whose versions stay in host memory (never evicted)
    # Host memory for adapters no request uses (None: a tenth of the machine's memory, at most 2 GiB);
    # beyond it the least recently used are dropped and read again from their file on next use.
    adapter_cache_mib: float | None = None
    max_mixes: int = 16  # weighted adapter mixes kept loaded; beyond, the least recently used idle one is unloaded
    auth_token_file: Path | None = None  # bearer token for Adapters.Load/Unload (or every call: auth_scope)
    auth_scope: AuthScope = "admin"
    metrics_port: int | None = None  # Prometheus HTTP(S) port (0 = any free port, None = off)
    # A prompt (or the task inputs) over this many UTF-8 bytes is refused before tokenizing
    # (None = BYTES_PER_CONTEXT_TOKEN per token of the model's context length).
    max_prompt_bytes: int | None = None
    tls: ServerTLS | None = None  # None = plaintext (loopback, or behind a TLS-terminating proxy)
    # OpenAI-compatible HTTP port beside gRPC (0 = any free port, None = off); needs `loraplex[http]`.
    # Same auth (scope `all` guards its /v1 routes), TLS and metrics as the gRPC port.
    http_port: int | None = None
    load_package_adapters: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
        self.package = Path(self.package)
        self.engine = resolve_engine(self.engine, self.device)
        preset = get_profile(self.profile)
        if self.allow_spinning is None and self.spin_us is None:  # spinning chosen explicitly: no bound
            self.spin_us = preset.spin_us
        for option in ("max_batch", "max_queue", "intra_op_threads", "allow_spinning", "memory_arena",
                       "warm_adapters", "malloc_arenas"):
            if getattr(self, option) is None:
                setattr(self, option, getattr(preset, option))
        if self.prefix_cache_mib is None and self.engine == "batched":  # genai has none
            self.prefix_cache_mib = preset.prefix_cache_mib
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError("max_slots must be >= 1 (or None: one per batch row)")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError("max_prompt_bytes must be >= 1 (or None: derived from the context length)")
        if self.adapter_cache_mib is not None and self.adapter_cache_mib < 0:
            raise ValueError("adapter_cache_mib must be >= 0 (0: no host copies of adapters no request uses)")
        if self.speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_MODES)} (got {self.speculation!r})")
        if self.prefix_cache_mib is not None and self.prefix_cache_mib < 0:
            raise ValueError("prefix_cache_mib must be >= 0 (0: no prefix cache)")
        if self.intra_op_threads < 0:
            raise ValueError("intra_op_threads must be >= 0 (0: one per physical core)")

    def engine_options(self) -> dict:
        """The keyword arguments `build_engine` takes from this configuration."""
        return dict(device=self.device, provider=self.provider, max_batch=self.max_batch, max_slots=self.max_slots,
                    intra_op_threads=self.intra_op_threads, allow_spinning=self.allow_spinning,
                    memory_arena=self.memory_arena, session_cache=self.session_cache,
                    prefix_cache_bytes=None if self.prefix_cache_mib is None else int(self.prefix_cache_mib * 2**20),
                    adapter_cache_bytes=None if self.adapter_cache_mib is None else int(self.adapter_cache_mib * MIB),
                    speculation=self.speculation, spin_us=self.spin_us)
