"""The batched engine's prefix cache: the KV of prompt prefixes kept across requests, in blocks.

Every request of a task renders the same template, so its prompt starts with the same tokens. The
cache keeps the KV of prompts in blocks of `block_tokens` tokens, each keyed by everything that
decides its values: the model's weights for the row (the adapter version's content, never its name;
`BASE` for the base model) and every token from the start of the prompt to the block's end. A
block's key chains its parent's key with its own tokens, so a shared template prefix is found
whatever the fields that follow it, and two adapters (or two versions of one name) with different
weights never meet. Blocks also keep their tokens and namespace, and a match compares them, so even
a hash collision cannot serve another prefix.

Bounded by bytes, in two segments (segmented LRU): a stored block starts on probation and moves to
the protected segment when a request starts from it, so prompts seen once (free text, one-off
requests) evict each other before a template that serves again; the protected segment holds at most
`PROTECTED_SHARE` of the bound (beyond, its least recently used blocks go back on probation).
Eviction takes probation's least recently used block first. A match refreshes a chain from its
deepest block to its first, so a chain's first blocks (shared by the most prompts) are the last to
go, and storing a chain never evicts its own blocks. An unloaded adapter's blocks are dropped
(`drop`).

Pure Python: a block's payload is opaque here (the engine stores a copy of the KV positions and
copies it back into a row at admission; see `runner.ModelRunner`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BASE = "base"  # the base model's namespace; an adapter's is `adapter:<content digest>`
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_MIB = 64  # about 1400 tokens of SmolLM2-135M's KV (30 layers, 3 KV heads of 64, fp32)
PROTECTED_SHARE = 0.8


@dataclass(eq=False)
class Block:
    key: bytes
    parent: bytes
    namespace: str
    tokens: tuple[int, ...]
    payload: Any
    nbytes: int
    protected: bool = False  # a request started from it (see the module doc)


@dataclass
class PrefixStats:
    """Counters (written by the engine thread, read by metrics from any)."""

    lookups: int = 0  # requests admitted with the cache on
    hits: int = 0  # of those, requests that started from a cached prefix
    tokens_reused: int = 0  # prompt tokens not computed thanks to the cache
    prompt_tokens: int = 0  # prompt tokens of the requests looked up
    stored_blocks: int = 0
    evicted_blocks: int = 0  # to stay within the byte bound
    dropped_blocks: int = 0  # of unloaded adapters


def adapter_namespace(digest: str) -> str:
    return f"adapter:{digest}"


def weights_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 of an adapter's weights (names, dtypes, shapes and bytes): its content, whatever its name."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


class PrefixCache:
    def __init__(self, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError(f"a prefix cache needs max_bytes >= 0 and block_tokens >= 1 (got {max_bytes}, "
                             f"{block_tokens})")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.stats = PrefixStats()
        self._blocks: dict[bytes, Block] = {}
        self._probation: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self._protected: OrderedDict[bytes, None] = OrderedDict()
        self._protected_bytes = 0
        self._by_namespace: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, namespace: str, tokens: Sequence[int]) -> list[Block]:
        """The cached blocks that begin `tokens`, in order (the longest chain cached); refreshes them."""
        found = []
        for key, parent, chunk in self._chain(namespace, tokens):
            block = self._blocks.get(key)
            if block is None or block.parent != parent or block.tokens != chunk or block.namespace != namespace:
                break
            found.append(block)
        for block in reversed(found):  # the first blocks end up the most recently used
            self._promote(block)
        return found

    def record(self, prompt_tokens: int, reused: int) -> None:
        """Count one admitted request's lookup."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += prompt_tokens
        if reused:
            self.stats.hits += 1
            self.stats.tokens_reused += reused

    def store(self, namespace: str, tokens: Sequence[int], read: Callable[[int, int], Any]) -> int:
        """Keep the full blocks of `tokens` not cached yet; `read(start, stop)` gives the payload of
        positions [start, stop) (an array: its `nbytes` count). Returns the blocks stored."""
        chain, stored = [], 0
        for index, (key, parent, chunk) in enumerate(self._chain(namespace, tokens)):
            block = self._blocks.get(key)
            if block is None:
                start = index * self.block_tokens
                payload = read(start, start + self.block_tokens)
                block = Block(key, parent, namespace, chunk, payload, int(payload.nbytes))
                if not self._make_room(block.nbytes, keep={b.key for b in chain}):
                    break
                self._blocks[key] = block
                self._probation[key] = None
                self._by_namespace.setdefault(namespace, set()).add(key)
                self.bytes += block.nbytes
                self.stats.stored_blocks += 1
                stored += 1
            elif block.parent != parent or block.tokens != chunk or block.namespace != namespace:
                break  # a collision: never chain through another prefix's block
            chain.append(block)
            self._refresh(block)
        for block in reversed(chain):
            self._refresh(block)
        return stored

    def drop(self, namespace: str) -> int:
        """Forget every block of `namespace` (an adapter version unloaded); returns how many."""
        keys = self._by_namespace.pop(namespace, set())
        for key in keys:
            self._remove(key)
        self.stats.dropped_blocks += len(keys)
        return len(keys)

    def clear(self) -> None:
        for namespace in list(self._by_namespace):
            self.drop(namespace)

    def _chain(self, namespace: str, tokens: Sequence[int]) -> Iterator[tuple[bytes, bytes, tuple[int, ...]]]:
        """(key, parent key, tokens) of each full block of `tokens`, from the first."""
        parent = hashlib.blake2b(f"prefix|{namespace}".encode(), digest_size=16).digest()
        size = self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            chunk = tuple(int(t) for t in tokens[start:start + size])
            key = hashlib.blake2b(parent + np.asarray(chunk, dtype=np.int64).tobytes(), digest_size=16).digest()
            yield key, parent, chunk
            parent = key

    def _make_room(self, nbytes: int, keep: set[bytes]) -> bool:
        """Evict least recently used blocks until `nbytes` more fit; False (nothing more evicted) when
        that would take a block of `keep` (the chain being stored: its later blocks need it)."""
        if nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            key = next((k for segment in (self._probation, self._protected) for k in segment if k not in keep), None)
            if key is None:
                return False
            self._by_namespace[self._blocks[key].namespace].discard(key)
            self._remove(key)
            self.stats.evicted_blocks += 1
        return True

    def _refresh(self, block: Block) -> None:
        (self._protected if block.protected else self._probation).move_to_end(block.key)

    def _promote(self, block: Block) -> None:
        """A request starts from `block`: the most recently used of the protected segment."""
        if not block.protected:
            del self._probation[block.key]
            self._protected[block.key] = None
            block.protected = True
            self._protected_bytes += block.nbytes
        self._protected.move_to_end(block.key)
        while self._protected_bytes > PROTECTED_SHARE * self.max_bytes:
            key, _ = self._protected.popitem(last=False)
            demoted = self._blocks[key]
            demoted.protected = False
            self._protected_bytes -= demoted.nbytes
            self._probation[key] = None

    def _remove(self, key: bytes) -> None:
        block = self._blocks.pop(key, None)
        if block is not None:
            self.bytes -= block.nbytes
            if block.protected:
                del self._protected[key]
                self._protected_bytes -= block.nbytes
            else:
                del self._probation[key]
            if not self._by_namespace.get(block.namespace):
                self._by_namespace.pop(block.namespace, None)
