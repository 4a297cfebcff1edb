"""Each step's LoRA weights for the banked graph (see `graph`): one slot's, or each row's.

The banked graph reads every LoRA weight as `[slot_rows, ...]`. A step whose rows all use one slot
(one stream, or every client on one adapter: the common case) gets that slot's part of each bank,
an OrtValue over the bank's own memory: nothing is copied. A step whose rows use several slots
gets buffers `[rows, ...]`, one row per KV row, that the gather graph (one Gather per bank) fills
from the banks. A buffer row keeps what it holds: a decode step whose rows use the slots they used
at the step before (a request keeps its adapter, and its KV row, from token to token) gathers
nothing, so a mixed batch's steady decoding reads each row's weights once per step, as a
single-slot step reads its slot's. Rows are gathered again when their slot changes, and for a slot
whose bank rows were filled anew (`refilled`).

The buffers hold `max_rows` rows (the KV cache's), made at the first step of several slots in an
anonymous mapping (`bank.zero_arrays`: rows no step has used take no memory) and freed whenever the
engine is idle; on SmolLM2-135M with rank-8 adapters on q/k/v/o, 3.5 MiB per row. The gather session
runs on the calling thread alone (one thread: a pool's spinning workers would take cores from the
model's run that follows). Only the engine thread uses this class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from loraplex.runtime.engines.batched.bank import WeightBank, zero_arrays
from loraplex.runtime.engines.batched.graph import GATHERED_SUFFIX, SLOT_INPUT

Weights = dict[str, ort.OrtValue]


class RowWeights:
    def __init__(self, bank: WeightBank, gather_graph: Path, max_rows: int):
        self.bank = bank
        self.max_rows = max_rows
        self.gathers = 0  # gather runs so far (steps whose rows' slots had changed)
        self._gather_graph = gather_graph
        self._session: ort.InferenceSession | None = None
        self._generation = -1  # the bank generation the views below are of
        self._slots: dict[int, Weights] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self._held = np.full(max_rows, -1, dtype=np.int64)  # the slot each buffer row holds (-1: none)
        self._ranges: dict[tuple[int, int], tuple[Weights, ort.IOBinding]] = {}

    def of_slot(self, slot: int) -> Weights:
        """Every LoRA input as `[1, ...]`: the banks' part for `slot`, sharing their memory."""
        self._check_generation()
        weights = self._slots.get(slot)
        if weights is None:
            weights = {name: ort.OrtValue.ortvalue_from_numpy(bank[slot: slot + 1])
                       for name, bank in self.bank.arrays.items()}
            self._slots[slot] = weights
        return weights

    def of_rows(self, start: int, stop: int) -> Weights:
        """Every LoRA input as `[stop - start, ...]`: buffer rows [start, stop), which `gather` fills."""
        return self._range(start, stop)[0]

    def gather(self, start: int, slots: np.ndarray) -> None:
        """Make buffer rows [start, start + len(slots)) hold `slots`' weights (a no-op where they do)."""
        stop = start + len(slots)
        self._check_generation()
        if np.array_equal(self._held[start:stop], slots):
            return
        binding = self._range(start, stop)[1]
        binding.bind_cpu_input(SLOT_INPUT, slots)
        assert self._session is not None
        self._session.run_with_iobinding(binding)
        self._held[start:stop] = slots
        self.gathers += 1

    def refilled(self, slot: int) -> None:
        """`slot`'s bank rows hold other weights now: buffer rows holding it are gathered again."""
        self._held[self._held == slot] = -1

    def release(self) -> None:
        """Free the buffers and every view (the engine is idle)."""
        self._slots.clear()
        self._ranges.clear()
        self._buffers = {}
        self._held[:] = -1

    def _check_generation(self) -> None:
        if self._generation != self.bank.generation:  # the banks were reallocated: every view is stale
            self.release()
            self._generation = self.bank.generation

    def _range(self, start: int, stop: int) -> tuple[Weights, ort.IOBinding]:
        if not 0 <= start < stop <= self.max_rows:
            raise ValueError(f"rows [{start}, {stop}) outside the buffers' 0..{self.max_rows}")
        self._check_generation()
        entry = self._ranges.get((start, stop))
        if entry is None:
            if not self._buffers:
                self._buffers = zero_arrays({name: (self.max_rows, *bank.shape[1:])
                                             for name, bank in self.bank.arrays.items()})
            binding = self._gather_session().io_binding()
            weights = {}
            for name, bank in self.bank.ortvalues.items():
                binding.bind_ortvalue_input(name, bank)
                weights[name] = ort.OrtValue.ortvalue_from_numpy(self._buffers[name][start:stop])
                binding.bind_ortvalue_output(name + GATHERED_SUFFIX, weights[name])
            entry = self._ranges[(start, stop)] = (weights, binding)
        return entry

    def _gather_session(self) -> ort.InferenceSession:
        if self._session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self._gather_graph), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session
