"""The adapter weight banks of the batched graph, and which adapter version sits in which slot.

Every LoRA input pair of the banked graph (loraplex.adapters.lora_bank) is one bank
`[slots, in, r]` / `[slots, r, out]`; row i of a batch uses slot `adapter_slot[i]`. Slot 0 is
all zeros, the base model. Adapters live in host memory (numpy, read with onnxruntime's
AdapterFormat API); a slot is filled when a request needs an adapter that is not resident,
evicting the least recently used slot that no running row uses. A slot in use is never evicted:
a request whose adapter finds no free slot waits in the queue. So that it cannot wait forever
behind a steady stream of requests for resident adapters, the engine then *drains* one busy
slot: no new row joins it, and once its rows finish the waiting request takes it.

The banks are numpy arrays wrapped once in OrtValues that share their memory, so filling a slot
is a copy into the array and the session sees it at its next run, with nothing rebound. Only
the engine thread touches this class.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from loraplex.runtime.engine import AdapterHandle
from loraplex.runtime.errors import AdapterIncompatible

BASE_SLOT = 0


def read_adapter_weights(path: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Read an .onnx_adapter file into host memory and check it against the graph's LoRA inputs.

    `shapes` maps each LoRA input name to its fixed (in or out) dim and kind: (fixed, 0) for A
    `[in, r]`, (0, fixed) for B `[r, out]`. Names the graph lacks or wrong dims raise
    AdapterIncompatible; inputs the file omits stay zero (exact: that module is not adapted).
    """
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        params = adapter.get_parameters()
    except Exception as exc:  # onnxruntime raises a bare RuntimeError for a bad file
        raise AdapterIncompatible(f"{path} is not a readable .onnx_adapter file ({exc}); re-export it") from exc
    weights: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if name not in shapes:
            raise AdapterIncompatible(
                f"adapter {path.name} has weight {name} but the package graph has no such LoRA input; "
                "re-export the package with this adapter's target modules included"
            )
        # Copy: the arrays view memory that the AdapterFormat object frees when it goes away.
        array = np.array(value.numpy(), dtype=np.float32, copy=True)
        a_in, b_out = shapes[name]
        if array.ndim != 2 or (a_in and array.shape[0] != a_in) or (b_out and array.shape[1] != b_out):
            want = f"[{a_in}, r]" if a_in else f"[r, {b_out}]"
            raise AdapterIncompatible(
                f"adapter {path.name}: {name} has shape {list(array.shape)}, the graph needs {want}; "
                "was it exported for another base model?"
            )
        weights[name] = array
    if not weights:
        raise AdapterIncompatible(f"adapter {path.name} has no weights")
    return weights


def adapter_rank(weights: dict[str, np.ndarray]) -> int:
    return max(w.shape[1] if ".lora_A." in n else w.shape[0] for n, w in weights.items())


class AdapterBanks:
    """Bank arrays (numpy + OrtValue views) and the slot table: LRU, pinned while in use."""

    def __init__(self, shapes: dict[str, tuple[int, int]], max_slots: int, rank: int):
        if max_slots < 1:
            raise ValueError(f"max_slots must be at least 1 (got {max_slots})")
        self.shapes = shapes
        self.max_slots = max_slots
        self.rank = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.ortvalues: dict[str, ort.OrtValue] = {}
        self._allocate(max(rank, 1))
        self._slot_of: dict[AdapterHandle, int] = {}
        self._owner: dict[int, AdapterHandle] = {}
        self._users: dict[int, int] = {}  # slot -> running rows on it
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unused slots: LRU first
        self._free = list(range(max_slots, 0, -1))  # never-filled slots, popped from the end
        self.draining: int | None = None  # a busy slot no new row may join (see drain_one)
        self.fills = 0  # adapter copies into a slot (a metric: swapping cost)

    def _allocate(self, rank: int) -> None:
        """(Re)allocate banks of `rank`, keeping what the slots hold (zero-padded: exact)."""
        arrays = {}
        for name, (a_in, b_out) in self.shapes.items():
            shape = (self.max_slots + 1, a_in, rank) if a_in else (self.max_slots + 1, rank, b_out)
            new = np.zeros(shape, dtype=np.float32)
            old = self.arrays.get(name)
            if old is not None:
                if a_in:
                    new[:, :, : self.rank] = old
                else:
                    new[:, : self.rank, :] = old
            arrays[name] = new
        self.arrays = arrays
        self.ortvalues = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.rank = rank

    def acquire(self, handle: AdapterHandle | None) -> int | None:
        """The slot for `handle` with one more user, filling a slot if needed; None if all are busy."""
        if handle is None:
            return BASE_SLOT
        slot = self._slot_of.get(handle)
        if slot is not None and slot == self.draining:
            if slot in self._users:
                return None
            self.draining = None  # drained; the waiting request came first in the queue if it still waits
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                return None
            self._fill(slot, handle)
            self.draining = None  # a waiting adapter got its slot
        self._idle.pop(slot, None)
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def drain_one(self) -> None:
        """A request waits for a slot: stop new rows joining the busy slot with the fewest rows."""
        if self.draining is None and self._users:
            self.draining = min(self._users, key=self._users.__getitem__)

    def release(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        self._users[slot] -= 1
        if self._users[slot] == 0:
            del self._users[slot]
            self._idle[slot] = None  # most recently used at the end

    def forget(self, handle: AdapterHandle) -> bool:
        """Drop an unloaded adapter version from its slot; False (nothing done) while rows still use it."""
        slot = self._slot_of.get(handle)
        if slot is None:
            return True
        if slot in self._users:
            return False
        del self._slot_of[handle]
        del self._owner[slot]
        self._idle.pop(slot, None)
        self._free.append(slot)
        if self.draining == slot:
            self.draining = None
        return True

    def resident(self) -> dict[int, AdapterHandle]:
        return dict(self._owner)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        del self._slot_of[self._owner.pop(slot)]
        return slot

    def _fill(self, slot: int, handle: AdapterHandle) -> None:
        weights: dict[str, np.ndarray] = handle.state
        rank = adapter_rank(weights)
        if rank > self.rank:
            self._allocate(rank)
        for name, bank in self.arrays.items():
            bank[slot] = 0.0
            w = weights.get(name)
            if w is None:
                continue
            if ".lora_A." in name:
                bank[slot, :, : w.shape[1]] = w
            else:
                bank[slot, : w.shape[0], :] = w
        self._slot_of[handle] = slot
        self._owner[slot] = handle
        self.fills += 1
