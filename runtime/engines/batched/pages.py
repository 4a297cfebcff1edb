"""Model-file pages the session read while it loaded but decoding does not read, out of the process.

A session made from the per-machine cache (`session`) maps the cached data file. While it loads,
onnxruntime reads every MatMulNBits node's scales and zero points, but its prepacked weights carry
their own copy of them: decoding reads the prepacked buffers only. It also reads part of the
embedding table (the tied LM head's int8 copy that constant folding made for the gather, and its
scales), of which a request reads only the rows of its tokens; each row it faults in brings the
pages around it (the kernel's fault-around), so a few long prompts map most of the table again.
Measured on SmolLM2-135M int4 (`/proc/self/pagemap`, the bench's memory scenario: a request on the
base and on each adapter, RSS 2 s later): 37 MiB less RSS at rest (284 -> 247 MiB), all dropped
whenever the engine is idle (the scales stay out; the next request re-faults only its own rows of
the table; no measurable cost).

`UnreadPages` finds those initializers in the cached graph (a small protobuf walk: no `onnx`
import at start) and `madvise(MADV_DONTNEED)`s the whole pages they cover in the process's mappings
of the data file. Safe: onnxruntime maps each initializer privately (MAP_PRIVATE) from a file nothing
writes and never writes to it (checked per page in /proc/self/pagemap: a range holding a page copied
on write is left alone); a page dropped is only unmapped from this process (the page cache keeps
it), and whatever reads it next, even while the drop runs, faults it back in with the same bytes.
An initializer that any other node (or another input) also reads is kept. Linux only; elsewhere a
no-op.
"""

from __future__ import annotations

import bisect
import logging
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from loraplex.runtime.engines.process_pages import copied_on_write, dontneed, entries, linux

log = logging.getLogger(__name__)

# Inputs a node reads at most in part once loaded: MatMulNBits' weight, scales and zero points, which its
# prepacked weight holds (the kernel reads that copy), and the table a gather reads the requested rows of.
UNREAD_INPUTS = {"MatMulNBits": (1, 2, 3), "GatherBlockQuantized": (0, 2, 3), "Gather": (0,)}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as ints, length-delimited fields as bytes."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _graph(model: bytes) -> bytes:
    return next(value for number, value in _fields(model) if number == 7)  # ModelProto.graph


def external_initializers(graph: bytes) -> dict[str, tuple[str, int, int]]:
    """Initializer name -> (data file, offset, length) for those stored outside the graph."""
    found = {}
    for number, tensor in _fields(graph):
        if number != 5:  # GraphProto.initializer
            continue
        name, external, location = "", {}, 0
        for field, value in _fields(tensor):
            if field == 8:  # TensorProto.name
                name = value.decode()
            elif field == 14:  # data_location (1: EXTERNAL)
                location = value
            elif field == 13:  # external_data: StringStringEntryProto
                entry = dict(_fields(value))
                external[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
        if location == 1 and "location" in external and "length" in external:
            found[name] = (external["location"], int(external.get("offset", 0)), int(external["length"]))
    return found


def unread_only(graph: bytes) -> set[str]:
    """Names every node reads only as one of its `UNREAD_INPUTS`."""
    packed: set[str] = set()
    other: set[str] = set()
    for number, node in _fields(graph):
        if number != 1:  # GraphProto.node
            continue
        inputs, op_type = [], ""
        for field, value in _fields(node):
            if field == 1:
                inputs.append(value.decode())
            elif field == 4:
                op_type = value.decode()
        kept = UNREAD_INPUTS.get(op_type, ())
        for index, name in enumerate(inputs):
            (packed if index in kept else other).add(name)
    return packed - other


def unread_ranges(model_path: Path) -> dict[Path, list[tuple[int, int]]]:
    """Data file -> (offset, length) ranges of the initializers read only as `UNREAD_INPUTS`."""
    graph = _graph(Path(model_path).read_bytes())
    initializers = external_initializers(graph)
    ranges: dict[Path, list[tuple[int, int]]] = {}
    for name in unread_only(graph):
        if name in initializers:
            location, offset, length = initializers[name]
            ranges.setdefault(Path(model_path).parent / location, []).append((offset, length))
    return ranges


def _mappings(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's private mappings of `path`."""
    found = []
    target = str(path.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:
            head = line.split(maxsplit=5)
            if len(head) == 6 and head[5].rstrip("\n") == target and head[1].endswith("p"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                found.append((start, end, int(head[2], 16)))
    return found


def _written(pagemap, address: int, length: int) -> bool:
    """Whether a page of [address, address + length) is anonymous (copied on write) in this process."""
    return bool(np.any(copied_on_write(entries(pagemap, address, length))))


class UnreadPages:
    """`unread_ranges(model_path)`, found at the first `drop`; `drop` hands their pages back whenever
    called: the session registers it to run whenever the engine is idle (`heap.on_idle`), so it costs
    a start nothing, and the gathered rows requests brought back (each with the pages around it that
    the kernel maps on a fault) leave again at rest."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.ranges: dict[Path, list[tuple[int, int]]] | None = None

    def drop(self) -> int:
        """madvise(MADV_DONTNEED) the whole pages of the ranges in this process's private mappings of
        their data files, where none was written; the bytes dropped (0 where this is not Linux)."""
        if self.ranges is None:
            self.ranges = {}
            if linux():
                try:
                    self.ranges = unread_ranges(self.model_path)
                except Exception as exc:  # a graph this walk cannot read: its pages stay mapped
                    log.debug("keeping the pages of %s mapped (%s)", self.model_path, exc)
        if not self.ranges:
            return 0
        page = mmap.PAGESIZE
        dropped = 0
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for data_file, ranges in self.ranges.items():
                # by file offset: (first byte, end, address of the first byte)
                mapped = sorted((offset, offset + end - start, start) for start, end, offset in _mappings(data_file))
                firsts = [m[0] for m in mapped]
                for offset, length in ranges:
                    index = max(bisect.bisect_right(firsts, offset) - 1, 0)
                    while index < len(mapped) and mapped[index][0] < offset + length:
                        map_first, map_end, address = mapped[index]
                        index += 1
                        first = -(-max(offset, map_first) // page) * page  # whole pages inside the range only
                        last = min(offset + length, map_end) // page * page
                        if last <= first or _written(pagemap, address + first - map_first, last - first):
                            continue  # a written page holds what is not in the file: dropping it would lose it
                        if not dontneed(address + first - map_first, last - first):
                            return dropped
                        dropped += last - first
        return dropped


def drop_unread_pages(model_path: Path) -> int:
    """`UnreadPages(model_path).drop()`."""
    return UnreadPages(model_path).drop()
