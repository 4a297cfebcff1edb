"""The recipe package (built without torch) serves on both engines, and the batched engine's greedy
tokens equal onnxruntime-genai's for the base and every adapter, alone and in one mixed batch.

Nothing here, nor in the fixtures it uses, imports torch, transformers, peft or olive: this is the
runtime tier that needs only the runtime's dependencies (`make test-runtime`). The last test proves
it in a subprocess where importing them fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.client import Client

from tests.fixtures.recipe_package import RECIPE_ADAPTERS
from tests.fixtures.serving import ENGINES, ServerThread, serving_config

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "olive")
MAX_BATCH = 8
NEW_TOKENS = 24
# Prompt lengths from 1 token to a few dozen: GroupQueryAttention's masks see the mix.
PROMPTS = ("Hello", "The weather today is", "ka lo mi ne ru sa ti vo an er in on st th re ou ka lo mi ne ru sa")
TASK_INPUTS = {"alpha": {"text": "a fine day"}, "beta": {"text": "stone"}, "gamma": {"word": "bread"}}


@pytest.fixture(scope="module")
def servers(recipe_package: Path) -> Iterator[dict[str, ServerThread]]:
    """One server per engine on the recipe package."""
    started: dict[str, ServerThread] = {}
    try:
        for engine in ENGINES:
            started[engine] = ServerThread(serving_config(recipe_package, engine=engine, max_batch=MAX_BATCH,
                                                          max_queue=4 * MAX_BATCH))
        yield started
    finally:
        for handle in started.values():
            handle.stop()


def tokens(client: Client, adapter: str, prompt: str | None = None, inputs: dict | None = None) -> list[int]:
    reply = client.generate(adapter, prompt, inputs, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return list(reply.token_ids)


def requests() -> list[tuple[str, str | None, dict | None]]:
    """(adapter, prompt, inputs): the base and each adapter on every prompt, each adapter on its task."""
    plain = [(name, prompt, None) for name in ("", *RECIPE_ADAPTERS) for prompt in PROMPTS]
    return plain + [(name, None, TASK_INPUTS[name]) for name in RECIPE_ADAPTERS]


def test_the_recipe_is_a_package_whose_two_tokenizers_agree(recipe_package: Path):
    """It opens as a server opens it; its adapter files pass the server's checks; onnxruntime-genai's
    tokenizer encodes as the `tokenizers` library the manifest names."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    package = Package.open(recipe_package)
    assert package.manifest.tokenizer == "tokenizers" and package.manifest.base_parity is None
    assert len(package.lora_inputs.pairs) == 2 * 7  # two layers, seven projections
    assert package.config.vocab_size == Tokenizer.from_file(str(recipe_package / "tokenizer.json")).get_vocab_size()
    for name, (rank, projections, _, _) in RECIPE_ADAPTERS.items():
        weights = read_adapter_file(package.adapter_path(name), package.lora_inputs)
        assert set(weights.ranks.values()) == {rank} and len(weights.ranks) == 2 * len(projections)
    ours = Tokenizer.from_file(str(recipe_package / "tokenizer.json"))
    theirs = og.Tokenizer(og.Config(str(recipe_package)))
    for text in (*PROMPTS, "Review: ünïcode, tabs\tand\nnewlines <|endoftext|> 42", "  spaces  "):
        assert [int(i) for i in theirs.encode(text)] == ours.encode(text, add_special_tokens=False).ids, text


def test_the_base_and_each_adapter_give_the_same_greedy_tokens_on_both_engines(servers):
    outputs: dict[str, dict] = {}
    for engine, server in servers.items():
        with server.client() as client:
            outputs[engine] = {(a, p, json.dumps(i)): tokens(client, a, p, i) for a, p, i in requests()}
    assert outputs["batched"] == outputs["genai"]
    # The adapters change the output, so equal tokens would catch an adapter that was not applied.
    first = {a: tuple(t) for (a, p, _), t in outputs["genai"].items() if p == PROMPTS[1]}
    assert len(set(first.values())) == len(first) == 1 + len(RECIPE_ADAPTERS)
    assert all(len(t) == NEW_TOKENS for t in outputs["genai"].values())


class _Gate:
    """Holds the jobs a server submits until `count` have come, then submits them together, so they
    share the batched engine's batch whatever the timing. It wraps the engine the request layer
    submits to and passes everything else through."""

    def __init__(self, server: ServerThread, count: int):
        self.service = server.running.service
        self.engine = self.service.engine
        self.count = count
        self.held: list = []
        self.lock = threading.Lock()
        self.service.engine = self

    def submit(self, job) -> None:
        with self.lock:
            self.held.append(job)
            if len(self.held) < self.count:
                return
            held, self.held = self.held, []
        for waiting in held:
            self.engine.submit(waiting)

    def remove(self) -> None:
        self.service.engine = self.engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_a_mixed_batch_of_the_base_and_every_adapter_equals_genai_token_for_token(servers):
    """Eight requests (the base and three adapters, two prompts each) decode in one batch; each gets
    onnxruntime-genai's greedy tokens for its own adapter."""
    batch = [(name, prompt, None) for name in ("", *RECIPE_ADAPTERS) for prompt in PROMPTS[1:]]
    assert len(batch) == MAX_BATCH
    with servers["genai"].client() as client:
        expected = [tokens(client, *request) for request in batch]
    batched = servers["batched"]
    gate = _Gate(batched, len(batch))
    try:
        with batched.client() as client, ThreadPoolExecutor(len(batch)) as pool:
            got = list(pool.map(lambda request: tokens(client, *request), batch))
    finally:
        gate.remove()
    assert got == expected
    assert batched.running.engine.scheduler.stats.max_rows == len(batch)  # they really shared the batch


SERVE_WITHOUT_TORCH = """
import asyncio, json, sys
for name in {heavy!r}:
    sys.modules[name] = None  # importing it now raises ImportError
from pathlib import Path
from loraplex.runtime.client import Client
from loraplex.runtime.server import ServerConfig, start_server
from tests.fixtures.recipe_package import build_recipe_package

def ask(target):
    with Client(target) as client:
        return [list(client.generate(a, "Hello", max_new_tokens=6, ignore_eos=True).token_ids) for a in ("", "alpha")]

async def main():
    package = build_recipe_package(Path(sys.argv[1]))
    out = {{}}
    for engine in ("batched", "genai"):
        running = await start_server(ServerConfig(package=package, port=0, engine=engine, max_batch=2))
        try:
            out[engine] = await asyncio.to_thread(ask, running.target)
        finally:
            await running.stop(5)
    print(json.dumps(out))

asyncio.run(main())
"""


def test_the_recipe_builds_and_serves_where_torch_transformers_peft_and_olive_cannot_import(tmp_path):
    code = SERVE_WITHOUT_TORCH.format(heavy=HEAVY)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "package")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["batched"] == out["genai"]
    assert all(len(t) == 6 for t in out["batched"]) and out["batched"][0] != out["batched"][1]
