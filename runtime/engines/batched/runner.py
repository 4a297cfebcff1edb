"""The batched engine's model runner: runs one scheduled batch through the banked graph.

It owns the ONNX Runtime session, the adapter weight banks and the KV cache, and makes no policy
decision: the scheduler says which rows run in which KV rows with which slots. Every run is a
`forward` of `RowInput`s: each row's KV row already holds `past` tokens and gets `tokens` more,
written in place at positions `[past, past + len(tokens))`, and the LM head computes only the
positions each row `read`s (`logits_index`). A prefill feeds the new rows' prompts (after the
part a cached prefix already put in the row); a decode step feeds every running row its last
token, and the drafts it verifies if any (`speculation`: rows with drafts run alone, see below).
Each row's token is chosen by its own
sampler (which masks the logits of a row with an output constraint, through llguidance; its view of
the package's tokenizer.json is built on a helper thread when first needed, and the constrained
rows' masks are computed on that thread while the session runs, both without the GIL).
InferenceSession.run releases the GIL, so the asyncio server keeps serving during a step.
See `kv` for the cache layout and why padding cannot change any row's result.

How `forward` maps onto GroupQueryAttention's CPU kernel (onnxruntime 1.32), which derives each
row's positions (rotary and causal mask) from `seqlens_k` = ReduceSum(attention_mask) - 1 and
`total_sequence_length` = the mask's width, and distinguishes three kinds of run:
- one new token per row (token generation): any batch, any pasts; the mask is at least 2 wide so
  a row with an empty past is not taken for a prompt;
- several new tokens and no past (first prompt, width = sequence length): any batch, rows
  right-padded to the longest;
- several new tokens after a past ("subsequent prompt"): the kernel refuses a batch of more than
  one row ("batch_size must be 1 when sequence_length > 1 and past context is given"), so each
  such row runs alone on its KV row `[i, i + 1)`, with past = seqlens_k + 1 - sequence length.
`forward` splits a step into those runs (neighbouring rows of one new token side by side, and of
no past; each row of several tokens after a past alone) and returns the logits of all of them,
what a plain prefill computes (bit for bit where the run has the same shape).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.batched.bank import WeightBank
from loraplex.runtime.engines.batched.graph import LOGITS_INDEX_INPUT, ensure_batched_model, gather_graph_path
from loraplex.runtime.engines.batched.kv import KVCache
from loraplex.runtime.engines.batched.row_weights import RowWeights
from loraplex.runtime.engines.batched.sampling import RowSampler, choose_tokens
from loraplex.runtime.engines.batched.scheduler import Batch, Row
from loraplex.runtime.engines.batched.session import SessionSettings, create_session
from loraplex.runtime.engines.batched.speculation import Speculator, choose_runs, resolve_mode, timed
from loraplex.runtime.engines.guidance import Guidance, RowConstraint
from loraplex.runtime.engines.heap import release_free_heap

TOKENIZER_FILE = "tokenizer.json"
MAX_BINDINGS = 256  # kept IOBindings (row ranges x slots); past this many they are made again as used
_LOGITS_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class RowInput:
    """One row of a `ModelRunner.forward` run: its KV row holds `past` tokens already; `tokens` are fed
    (written at positions `past`, `past + 1`, ...); the logits of `read` (offsets into `tokens`,
    negative from the end) are returned."""

    slot: int  # the adapter's bank slot (0: the base model)
    past: int
    tokens: Sequence[int]
    read: Sequence[int] = (-1,)


class ModelRunner:
    """`session`: onnxruntime's threads (0 = one per physical core); whether its idle threads busy-wait
    between parallel sections (lower latency on dedicated cores; on cores shared with other work it
    takes their time); its CPU arena, which keeps the largest activations it ever held (off: memory
    goes back after each run); and the per-machine session cache (`session`). `speculation`: which
    drafts decode steps verify (`speculation.MODES`; "off": one token per row and step)."""

    def __init__(self, package: Package, *, max_batch: int, max_slots: int, session: SessionSettings | None = None,
                 speculation: str = "auto"):
        config = package.config
        self.config = config
        self.speculator = Speculator(resolve_mode(speculation, package.manifest.precision), config.context_length)
        banked = ensure_batched_model(package.model_path)
        self.session = create_session(banked, session or SessionSettings())
        self.bank = WeightBank(package.lora_inputs.pairs, max_slots)
        self.weights = RowWeights(self.bank, gather_graph_path(banked), max_batch)
        self.kv = KVCache(config.num_layers, max_batch, config.num_kv_heads, config.context_length, config.head_size)
        # per (start, stop, slot or None for each row's own): see `_binding`
        self._bindings: dict[tuple[int, int, int | None], ort.IOBinding] = {}
        self._bindings_stamp = (-1, -1)
        self._logits: dict[tuple[int, int], np.ndarray] = {}  # each row range's logits output
        self._logits_bound: dict[tuple[int, int, int | None], np.ndarray] = {}  # what each binding writes into
        self._logits_dtype = _LOGITS_DTYPES[next(o.type for o in self.session.get_outputs()
                                                 if o.name == config.logits_name)]
        self._masks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-masks")
        self._package_root = package.root
        self._guidance: Future[Guidance] | None = None
        self._guidance_lock = threading.Lock()

    def want_guidance(self) -> Future[Guidance]:
        """llguidance's view of the tokenizer, loading on the helper thread from the first call on.

        Loaded by the first constrained request (an adapter's default output contract included), which
        waits for it (the engine's other rows go on): it costs ~0.2 s of CPU, holding the GIL, and
        ~19 MiB (49k vocabulary), which neither a start nor a server whose requests are never
        constrained pays."""
        with self._guidance_lock:
            if self._guidance is None:
                self._guidance = self._masks.submit(Guidance, self._package_root / TOKENIZER_FILE,
                                                    self.config.vocab_size, self.config.eos_token_ids)
            return self._guidance

    def guidance_ready(self) -> bool:
        """True once the tokenizer has loaded or failed to (`guidance_error` tells which)."""
        return self._guidance is not None and self._guidance.done()

    def constraint_of(self, row: Row) -> RowConstraint | None:
        """A fresh constraint state for a row whose request has one."""
        constraint = row.job.params.constraint
        if constraint is None:
            return None
        return self.want_guidance().result().row(constraint)  # a tokenizer that failed to load fails this row

    def guidance_error(self) -> str | None:
        """Why output constraints cannot be enforced (llguidance could not read tokenizer.json), or None
        (also while the tokenizer is loading or not asked for yet)."""
        if not self.guidance_ready() or self._guidance.exception() is None:  # type: ignore[union-attr]
            return None
        return str(self._guidance.exception()).split("\n", 1)[0][:200]  # type: ignore[union-attr]

    def close(self) -> None:
        self._masks.shutdown(wait=True)

    def _prepare_masks(self, rows: list[Row]) -> Future | None:
        """Start computing the next mask of every constrained row (off the critical path)."""
        constraints = [row.sampler.constraint for row in rows if row.sampler and row.sampler.constraint]
        if not constraints:
            return None

        def prepare() -> None:
            for constraint in constraints:
                constraint.prepare()

        return self._masks.submit(prepare)

    def run(self, batch: Batch, keep: int | None = None) -> list[int | list[int] | Exception]:
        """One step for `batch`: a token, or the row's own error, per row; in a decode step where rows
        verify drafts (`speculation`), a run of tokens per row. `keep`: how many KV rows must keep
        their contents if the cache grows (default: the rows running before it)."""
        for slot, adapter in batch.fills:
            self.bank.fill(slot, adapter)
            self.weights.refilled(slot)
        if batch.kind == "prefill":
            for row in batch.rows:
                if row.sampler is None:  # a prefill re-run row by row keeps its sampler
                    row.sampler = RowSampler(row.job.params, row.job.prompt_ids, self.config.vocab_size,
                                             self.constraint_of(row))
                self.speculator.start(row)
        drafts = self.speculator.propose(batch.rows) if batch.kind == "decode" else None  # before the masks
        masks = self._prepare_masks(batch.rows)
        seconds = None
        try:
            if batch.kind == "prefill":
                logits = self._prefill(batch.rows, batch.start, batch.start if keep is None else keep)
            else:
                logits, seconds = timed(lambda: self._decode(batch.rows, batch.start, drafts,
                                                             batch.start + len(batch.rows) if keep is None else keep))
        finally:
            if masks is not None:
                masks.result()  # the matchers are the engine thread's again
        samplers = [row.sampler for row in batch.rows]
        outcomes: list = choose_tokens(logits[:, 0, :], samplers) if drafts is None else \
            choose_runs(logits, samplers, drafts, self.config.eos_token_ids)  # type: ignore[arg-type]
        self.speculator.record(batch.rows, drafts, outcomes, seconds)
        return outcomes

    def compact(self, moves: list[tuple[int, int, int]], idle: bool) -> None:
        """Apply the scheduler's KV row moves; give memory back when nothing runs."""
        for source, destination, length in moves:
            self.kv.move_row(source, destination, length)
        if idle:
            self.kv.reset()

    def release_memory(self) -> None:
        """Nothing runs: free the KV cache and the bindings over it (each keeps its last logits output),
        made again by the next step, shrink the banks to the adapters in them, then hand the heap's
        free memory back to the system (see
        `runtime.engines.heap`). On SmolLM2-135M, 4 rows: 22 MiB less at rest."""
        self._bindings.clear()
        self._logits.clear()
        self._logits_bound.clear()
        self.weights.release()
        self.kv.release()
        self.bank.fit()  # a wide adapter or mix that left gives its rank back
        release_free_heap()

    def forward(self, start: int, rows: Sequence[RowInput], keep: int) -> np.ndarray:
        """Feed each row its new tokens on KV rows `[start, start + len(rows))`, in place.

        Returns logits `[rows, positions, vocab]`: row i's at its `read` offsets, in order (a row
        that reads fewer than the most has its last one repeated). The array may be the session's
        output buffer, which the next run over the same KV rows overwrites: copy what must outlive it.
        KV rows `[0, max(keep, start + len(rows)))` keep their contents if the cache grows. Rows of
        several new tokens after a past run one by one (see the module doc)."""
        if not rows:
            raise ValueError("forward needs at least one row")
        if any(not row.tokens for row in rows):
            raise ValueError("every row feeds at least one token")
        self.kv.ensure(max(row.past + len(row.tokens) for row in rows), rows=max(keep, start + len(rows)))
        width = max(len(row.read) for row in rows)
        parts, i = [], 0
        while i < len(rows):  # neighbours of one token each side by side, and of no past; others alone
            j = i + 1
            if len(rows[i].tokens) == 1:
                while j < len(rows) and len(rows[j].tokens) == 1:
                    j += 1
            elif rows[i].past == 0:
                while j < len(rows) and rows[j].past == 0:
                    j += 1
            parts.append(self._run_rows(start + i, rows[i:j], width))
            i = j
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run_rows(self, start: int, rows: Sequence[RowInput], width: int) -> np.ndarray:
        """One session run: every row has no past, or one token each, or the run has one row."""
        lengths = np.array([len(row.tokens) for row in rows], dtype=np.int64)
        pasts = np.array([row.past for row in rows], dtype=np.int64)
        new = int(lengths.max())
        ids = np.full((len(rows), new), self.config.pad_token_id, dtype=np.int64)
        index = np.empty((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : lengths[i]] = row.tokens
            offsets = [o if o >= 0 else lengths[i] + o for o in row.read]
            if not all(0 <= o < lengths[i] for o in offsets):
                raise ValueError(f"read offsets {list(row.read)} outside the row's {lengths[i]} new tokens")
            index[i] = offsets + [offsets[-1]] * (width - len(offsets))
        totals = pasts + lengths
        # GQA reads only each mask row's sum (its total length) and the mask's width.
        span = max(int(totals.max()), 2) if new == 1 else int(totals.max())
        mask = (np.arange(span)[None, :] < totals[:, None]).astype(np.int64)
        return self._run(ids, mask, rows, start, index)

    def _prefill(self, rows: list[Row], start: int, keep: int) -> np.ndarray:
        self.kv.ensure(max(row.length for row in rows), rows=keep)
        for i, row in enumerate(rows):
            if row.cached:
                self.kv.write(start + i, 0, row.prefix, row.cached)
        inputs = [RowInput(row.slot, row.cached, row.job.prompt_ids[row.cached:]) for row in rows]
        return self.forward(start, inputs, keep)

    def _decode(self, rows: list[Row], start: int, drafts: list[list[int]] | None, keep: int) -> np.ndarray:
        """Every row's last token, then its drafts if it has any (logits at each of them)."""
        if drafts is None:
            return self.forward(start, [RowInput(row.slot, row.length, (row.last_token,)) for row in rows], keep)
        return self.forward(start, [RowInput(row.slot, row.length, (row.last_token, *d), tuple(range(1 + len(d))))
                                    for row, d in zip(rows, drafts, strict=True)], keep)

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: Sequence[RowInput], start: int,
             index: np.ndarray) -> np.ndarray:
        """One session run over KV rows [start, start + len(rows)); logits [rows, positions, vocab] at
        `index` [rows, positions] (a 1-D index: one position per row)."""
        config = self.config
        if index.ndim == 1:
            index = index[:, None]
        slots = [row.slot for row in rows]
        shared = slots[0] if len(set(slots)) == 1 else None  # one slot for every row: its banks' part, no copy
        key = (start, start + len(rows), shared)
        binding = self._binding(*key)
        logits = self._logits.get(key[:2])
        if logits is None or logits.shape[1] != index.shape[1]:
            # The logits are written into an array bound as the output, read after the run without asking
            # onnxruntime for its outputs (about a tenth of a millisecond per step); a new width, a new array.
            # One per row range, whichever slot's binding runs over it.
            logits = np.empty((len(rows), index.shape[1], config.vocab_size), dtype=self._logits_dtype)
            self._logits[key[:2]] = logits
        if self._logits_bound.get(key) is not logits:
            binding.bind_output(config.logits_name, "cpu", 0, self._logits_dtype, logits.shape, logits.ctypes.data)
            self._logits_bound[key] = logits
        binding.bind_cpu_input(LOGITS_INDEX_INPUT, index)
        binding.bind_cpu_input(config.input_ids_name, ids)
        binding.bind_cpu_input(config.attention_mask_name, mask)
        if shared is None:
            self.weights.gather(start, np.array(slots, dtype=np.int64))
        self.session.run_with_iobinding(binding)
        return logits

    def _binding(self, start: int, stop: int, slot: int | None) -> ort.IOBinding:
        """An IOBinding of KV rows [start, stop) with the LoRA weights (`slot`'s for every row, or each
        row's as `weights` gathers them: None) and the cache views already bound.

        Kept per row range and slot until the banks or the cache are reallocated: binding every weight
        and cache tensor anew (hundreds of inputs on a 30-layer model) took about a tenth of a small
        model's decode step. Each run binds only its three small per-step inputs; binding a name again
        replaces the previous tensor.
        """
        stamp = (self.bank.generation, self.kv.generation)
        if stamp != self._bindings_stamp or len(self._bindings) >= MAX_BINDINGS:
            self._bindings.clear()
            self._logits.clear()
            self._logits_bound.clear()
            self._bindings_stamp = stamp
        binding = self._bindings.get((start, stop, slot))
        if binding is None:
            config = self.config
            binding = self.session.io_binding()
            weights = self.weights.of_rows(start, stop) if slot is None else self.weights.of_slot(slot)
            for name, value in weights.items():
                binding.bind_ortvalue_input(name, value)
            for names, (key, value) in zip(config.kv_names, self.kv.views(start, stop), strict=True):
                binding.bind_ortvalue_input(names.past_key, key)
                binding.bind_ortvalue_input(names.past_value, value)
                binding.bind_ortvalue_output(names.present_key, key)  # same memory: GQA updates the cache in place
                binding.bind_ortvalue_output(names.present_value, value)
            self._bindings[(start, stop, slot)] = binding
        return binding
