"""The adapter weight banks the banked graph reads: one array per LoRA input, one adapter per slot.

Every LoRA pair of the banked graph (see `graph`) is one bank `[slots, in, r]` / `[slots, r, out]`;
row i of a batch uses slot `adapter_slot[i]`. Slot 0 stays all zeros: the base model. An adapter
is copied into a slot when the slot table grants it one; modules it does not adapt and ranks below
the bank's stay zero, which is exact (zero columns of A meet zero rows of B). A higher-rank adapter
grows every bank once, keeping what the slots hold.

The banks are numpy arrays wrapped once in OrtValues that share their memory, so filling a slot is
a copy into the array and the session sees it at its next run, with nothing rebound. Only the
engine thread touches this class.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.adapters.package.lora_inputs import LoraPair


class WeightBank:
    def __init__(self, pairs: list[LoraPair], max_slots: int, rank: int = 1):
        self.pairs = pairs
        self.slots = max_slots + 1  # + the base model's slot 0
        self.rank = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.ortvalues: dict[str, ort.OrtValue] = {}
        self._allocate(max(rank, 1))

    def fill(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into `slot` (zeros where it has no tensor or a lower rank)."""
        if weights.rank > self.rank:
            self._allocate(weights.rank)
        for pair in self.pairs:
            for spec in (pair.a, pair.b):
                bank = self.arrays[spec.name]
                bank[slot] = 0.0
                tensor = weights.tensors.get(spec.name)
                if tensor is None:
                    continue
                if spec.kind == "A":
                    bank[slot, :, : tensor.shape[1]] = tensor
                else:
                    bank[slot, : tensor.shape[0], :] = tensor

    def _allocate(self, rank: int) -> None:
        """(Re)allocate every bank at `rank`, keeping what the slots hold."""
        arrays = {}
        for pair in self.pairs:
            for spec in (pair.a, pair.b):
                new = np.zeros((self.slots, *spec.shape(rank)), dtype=np.float32)
                old = self.arrays.get(spec.name)
                if old is not None:
                    if spec.kind == "A":
                        new[:, :, : self.rank] = old
                    else:
                        new[:, : self.rank, :] = old
                arrays[spec.name] = new
        self.arrays = arrays
        self.ortvalues = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.rank = rank
