"""The adapter weight banks the banked graph reads: two arrays per LoRA group, one adapter per slot.

Every LoRA group of the banked graph (`lora_groups`: the projections that read one input, or one
projection alone) is one pair of banks, `A [slots, in, r_g]` and `B [slots, r_g, width]`; row i of a
batch uses slot `adapter_slot[i]`. Each member module m of a group takes the bank's rank for m
(`ranks[m]`) consecutive columns of A and the same rows of B, in m's output columns (B is
block-diagonal). Slot 0 stays all zeros: the base model. Modules an adapter does not adapt and
ranks below the bank's stay zero in its slot, which is exact (zero columns of A meet zero rows of B).

Memory follows the adapters actually loaded, not the limits:
- slots are allocated as adapters arrive: the banks hold as many slots as the highest slot
  filled so far (plus slot 0), never `max_slots` up front;
- each module's rank is the largest rank of the adapters filled so far that adapt it (0 while none
  does): a rank-4 adapter on q/v beside a rank-16 one on the MLP does not pad q/v to 16; once the
  widest has left, an idle engine shrinks it back (`fit`). The banked graph gives each group its
  own symbolic rank dim, so ONNX Runtime's memory planner never takes two banks' ranks for equal;
- an adapter's weights live in one place only: its slot while it has one (the host copy read
  from its file is dropped once copied in), else a compact host copy at its own ranks (made again
  from the slot when an LRU swap gives the slot to another adapter). A slot costs more than the
  file (B's zeros off the block diagonal: about 1.5x for q/k/v/o at one rank); host copies cost
  the file's size.
A growth (more slots, a higher rank) reallocates the banks once, keeping what the slots hold.

The banks are numpy arrays wrapped in OrtValues that share their memory, so filling a slot is a
copy into the array and the session sees it at its next run. Only the engine thread touches
this class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from loraplex.runtime.engines.batched.lora_groups import GroupMember, LoraGroup

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.scheduler import BatchedAdapter


class WeightBank:
    def __init__(self, groups: list[LoraGroup], max_slots: int):
        self.groups = groups
        self.max_slots = max_slots  # adapter slots; slot 0 (the base) comes on top
        self.capacity = 0  # slots allocated, slot 0 included
        self.generation = 0  # counts reallocations: OrtValues bound before one are stale
        self.ranks: dict[str, int] = {m.module: 0 for g in groups for m in g.members}
        self.owner: dict[int, BatchedAdapter] = {}  # slot -> the adapter version whose weights it holds
        self.arrays: dict[str, np.ndarray] = {}
        self.ortvalues: dict[str, ort.OrtValue] = {}
        self._member = {m.module: (g, m) for g in groups for m in g.members}
        # Told when an adapter's only copy moves into a slot / out of it into host memory (its bytes).
        self.on_fill: Callable[[BatchedAdapter], None] = lambda adapter: None
        self.on_park: Callable[[BatchedAdapter, int], None] = lambda adapter, nbytes: None
        self._allocate(1, self.ranks)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def offset(self, module: str, ranks: dict[str, int] | None = None) -> int:
        """Where `module`'s columns of A (rows of B) start in its group's bank, at `ranks` (default: the bank's)."""
        ranks = self.ranks if ranks is None else ranks
        group, member = self._member[module]
        offset = 0
        for m in group.members:
            if m is member:
                return offset
            offset += ranks[m.module]
        raise KeyError(module)

    def fill(self, slot: int, adapter: BatchedAdapter) -> None:
        """Make `slot` hold `adapter` (a no-op if it already does); the slot's previous adapter, if
        still loaded, gets its host copy back first. Then the slot is the adapter's only copy."""
        if not 0 < slot <= self.max_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.max_slots}")
        if self.owner.get(slot) is adapter:
            return
        weights = adapter.weights
        if weights is None:
            raise RuntimeError(f"adapter {adapter.name}@{adapter.version} was unloaded before it was filled")
        if weights.ranks and not weights.tensors:  # still in a slot the slot table has given away
            elsewhere = next(s for s, a in self.owner.items() if a is adapter)
            self._park(elsewhere, adapter)
            del self.owner[elsewhere]
            weights = adapter.weights
        previous = self.owner.pop(slot, None)
        if previous is not None and previous.weights is not None:
            self._park(slot, previous)
        ranks = {m: max(r, weights.ranks.get(m, 0)) for m, r in self.ranks.items()}
        if slot >= self.capacity or ranks != self.ranks:
            self._allocate(max(self.capacity, slot + 1), ranks)
        for group in self.groups:
            self.arrays[group.a_input][slot] = 0.0
            self.arrays[group.b_input][slot] = 0.0
        for module in weights.ranks:
            member = self._member[module][1]
            tensor_a, tensor_b = weights.tensors[member.a_name], weights.tensors[member.b_name]
            self._a_view(slot, module, tensor_a.shape[1])[...] = tensor_a
            self._b_view(slot, module, tensor_b.shape[0])[...] = tensor_b
        self.owner[slot] = adapter
        adapter.weights = replace(weights, tensors={})  # the slot is the copy now
        self.on_fill(adapter)

    def fit(self) -> bool:
        """Shrink each module's rank to what the adapters still in slots need (a wide adapter or mix
        that left would otherwise keep every slot that wide); call only when no row runs. True if the
        banks were reallocated."""
        ranks = dict.fromkeys(self.ranks, 0)
        for adapter in self.owner.values():
            if adapter.weights is not None:
                for module, rank in adapter.weights.ranks.items():
                    if module in ranks:
                        ranks[module] = max(ranks[module], rank)
        if all(ranks[m] >= r for m, r in self.ranks.items()):
            return False
        self._allocate(self.capacity, ranks)
        return True

    def _a_view(self, slot: int, module: str, rank: int | None = None) -> np.ndarray:
        """Slot `slot`'s A columns of `module` at `rank` (default: the bank's), a view into its group's bank."""
        group = self._member[module][0]
        start = self.offset(module)
        stop = start + (self.ranks[module] if rank is None else rank)
        return self.arrays[group.a_input][slot, :, start:stop]

    def _b_view(self, slot: int, module: str, rank: int | None = None) -> np.ndarray:
        group, member = self._member[module]
        start = self.offset(module)
        stop = start + (self.ranks[module] if rank is None else rank)
        return self.arrays[group.b_input][slot, start:stop, member.column: member.column + member.out_features]

    def _park(self, slot: int, adapter: BatchedAdapter) -> None:
        """Copy `adapter` out of `slot` into a compact host copy (its own modules at its own ranks)."""
        assert adapter.weights is not None
        tensors = {}
        for module, rank in adapter.weights.ranks.items():
            member: GroupMember = self._member[module][1]
            tensors[member.a_name] = self._a_view(slot, module, rank).copy()
            tensors[member.b_name] = self._b_view(slot, module, rank).copy()
        adapter.weights = replace(adapter.weights, tensors=tensors)
        self.on_park(adapter, sum(t.nbytes for t in tensors.values()))

    def _allocate(self, capacity: int, ranks: dict[str, int]) -> None:
        """(Re)allocate the banks at `capacity` slots and per-module `ranks`, keeping what the slots hold."""
        keep = min(capacity, self.capacity)
        widths = {g.index: sum(ranks[m.module] for m in g.members) for g in self.groups}
        shapes = {}
        for g in self.groups:
            shapes[g.a_input] = (capacity, g.in_features, widths[g.index])
            shapes[g.b_input] = (capacity, widths[g.index], g.width)
        # One allocation for every bank (views into it): large enough to be its own memory mapping,
        # so the previous generation goes back to the system whole when it is freed, rather than
        # leaving hundreds of holes in the heap.
        block = np.zeros(sum(int(np.prod(shape)) for shape in shapes.values()), dtype=np.float32)
        arrays, offset = {}, 0
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            arrays[name] = block[offset: offset + size].reshape(shape)
            offset += size
        if keep:
            for module, old_rank in self.ranks.items():
                rank = min(old_rank, ranks[module])  # a shrink (`fit`) keeps what the slots' adapters use
                if not rank:
                    continue
                group, member = self._member[module]
                old_start, new_start = self.offset(module), self.offset(module, ranks)
                columns = slice(member.column, member.column + member.out_features)
                arrays[group.a_input][:keep, :, new_start: new_start + rank] = \
                    self.arrays[group.a_input][:keep, :, old_start: old_start + rank]
                arrays[group.b_input][:keep, new_start: new_start + rank, columns] = \
                    self.arrays[group.b_input][:keep, old_start: old_start + rank, columns]
        self.arrays = arrays
        self.ortvalues = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.capacity, self.ranks = capacity, dict(ranks)
        self.generation += 1
