"""Rewrite a package graph so that every row of a batch can use a different LoRA adapter.

The exported graph (onnxruntime-genai builder + Olive ExtractAdapters) takes each LoRA weight
as a graph input shared by the whole batch:

    y = x @ W  +  (x @ A) @ B          A: [in, lora_r], B: [lora_r, out]  (B pre-scaled)

For the `batched` engine every weight pair is fed per step: `[slot_rows, in, lora_r]` and
`[slot_rows, lora_r, out]`, where `slot_rows` is the batch (row i's adapter weights) or 1 (one
adapter for every row: each LoRA MatMul broadcasts it):

    y = x @ W  +  (x [batch, seq, in] @ A_rows) @ B_rows              (batched MatMul)

The engine keeps every loaded adapter in a *bank* per weight, one adapter per slot
(`[lora_slots, in, lora_r]`, `bank`). A step whose rows all use one slot binds that slot's part of
each bank as the weights, without a copy; a step whose rows use several slots reads buffers that
the *gather graph* written beside the banked one (`model.batched.gather.onnx`: one Gather per bank,
`adapter_slot [rows]` -> `[rows, in, lora_r]`) fills, again only when a row's slot changes
(`row_weights`). This replaced a Gather in front of every LoRA MatMul of the banked graph, whose
copies of each row's weights cost a one-row step about as much as the MatMuls reading the bank
directly; measured on SmolLM2-135M int4 (2 threads, runner steps, old and new code in turns, 4
rounds): 1 row -7%, 8 rows on one adapter -9%, 8 rows over 4 adapters -13% (its decode steps
gather nothing: a request keeps its adapter and KV row from token to token).

This is the BGMV idea of Punica and S-LoRA in plain ONNX ops, so it runs on every execution
provider. The weight inputs keep the LoRA input names of the original graph, so an adapter file's
tensors map one to one onto bank slots. Slot 0 is kept all zeros by the engine: the base model
(x @ 0 = 0 and y + 0 = y, exactly). Ranks below the bank's are zero-padded: exact. Each pair has
its own symbolic rank (`lora_r_0`, `lora_r_1`, ...): the engine sizes each bank to the ranks of the
adapters that adapt that module, and ONNX Runtime's memory planner takes tensors whose shapes
share a symbolic dim for equal in size (one shared `lora_r` with banks of different ranks fails
with "Shape mismatch attempting to re-use buffer").

Before that, the base projections that read the same input (q/k/v, gate/up) are fused into one
MatMul each (`fusion`: exact, and fewer, larger kernels); a fused q/k/v that no LoRA branch adds to
goes to the attention packed, without its Split.

Why each LoRA branch keeps its own banks: the branches of a fused group can be made one (A side by
side, B block-diagonal, one Gather and MatMul pair per group instead of per projection). Measured on
SmolLM2-135M int4 (2 threads, no profiler), that halved the LoRA nodes and saved nothing at one row,
while the block-diagonal B's zeros made every row's gathered weights 1.5x larger: an 8-row step over
4 adapters took 10% longer. onnxruntime's profiler had put the LoRA path at 31% of a one-row step;
that was the profiler's own per-node cost.

A further, independent change: the LM head computes only the positions each row asks for, picked
by a new input `logits_index [batch, positions]` (GatherND before the head), so `logits` is
`[batch, positions, vocab]`. A prefill then needs only each prompt's last position (`positions` = 1),
not `[batch, seq, vocab]`: for a small model with a large vocabulary the head is a large share of the
prefill's compute and memory; a step that checks several proposed tokens reads several.

Only `onnx` is needed (no torch, no olive): the batched engine calls `ensure_batched_model` on first
load and the result is cached next to the package's model (or, for a read-only package, in a
user cache directory). Initializers stored as external data stay where they are: the rewritten
model points at the same data file (hard-linked when it lives elsewhere), so no weights are copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from loraplex.adapters.package.lora_inputs import LoraInputs, LoraPair
from loraplex.runtime.engines.batched.fusion import fuse_shared_input_projections, pack_qkv_into_attention

log = logging.getLogger(__name__)

SLOT_INPUT = "adapter_slot"  # the gather graph's: each row's slot
GATHERED_SUFFIX = "/rows"  # the gather graph's output for a bank: its name + this
LOGITS_INDEX_INPUT = "logits_index"
LOGITS_POSITIONS_DIM = "logits_positions"
LOGITS_OUTPUT = "logits"
_HEAD_OPS = ("MatMul", "MatMulNBits", "Gemm")
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Softcap")
SLOTS_DIM = "lora_slots"
SLOT_ROWS_DIM = "slot_rows"  # a step's LoRA weights' first dim: the batch, or 1 (one slot for every row)
RANK_DIM = "lora_r"  # + "_<pair index>": each bank's own rank
BATCHED_SUFFIX = ".batched.onnx"
GATHER_SUFFIX = ".batched.gather.onnx"
FUSED_DATA_SUFFIX = ".fused.data"  # model.batched.fused.data: the fused projections' weights
_STAMP_SUFFIX = ".batched.json"
# Bump when the rewrite changes, so that cached graphs from an older loraplex are rebuilt.
REWRITE_VERSION = 8


class LoraBankError(ValueError):
    """The graph does not have the LoRA structure the rewrite expects."""


def _find_pairs(graph) -> list[LoraPair]:
    try:
        pairs = LoraInputs.from_graph(graph).pairs
    except ValueError as exc:
        raise LoraBankError(str(exc)) from exc
    if not pairs:
        raise LoraBankError(
            "the graph has no LoRA inputs (*.lora_A.MatMul.weight): export the package with at least one adapter "
            "so that its LoRA weights become graph inputs"
        )
    return pairs


def _batch_dim_name(graph) -> str:
    for inp in graph.input:
        if inp.name == "input_ids":
            first = inp.type.tensor_type.shape.dim[0]
            return first.dim_param or "batch_size"
    raise LoraBankError("the graph has no input_ids input: is this a decoder exported by loraplex?")


def rewrite_for_banks(model_path: str | Path, out_path: str | Path, *, fuse: bool = True) -> list[LoraPair]:
    """Write the banked version of `model_path` to `out_path`; external data is shared (hard-linked
    into `out_path`'s directory when that is another one), never copied.

    `fuse`: one MatMul for the projections that read the same input (`fusion`; exact).
    Returns the LoRA pairs found, in graph order. Raises LoraBankError when the graph has no
    LoRA inputs or when a LoRA input is consumed by anything other than one MatMul.
    """
    import onnx

    model_path, out_path = Path(model_path), Path(out_path)
    model = onnx.load(str(model_path), load_external_data=False)
    if model_path.parent.resolve() != out_path.parent.resolve():
        _link_external_data(model, model_path.parent, out_path.parent)
    graph = model.graph
    pairs = _find_pairs(graph)
    batch = _batch_dim_name(graph)
    _check_lora_consumers(graph, pairs)
    data_name = out_path.name.removesuffix(".onnx") + FUSED_DATA_SUFFIX
    data_tmp = out_path.with_name(f"{data_name}.{os.getpid()}.tmp")
    with open(data_tmp, "wb") as data:
        fused = fuse_shared_input_projections(graph, model_path.parent, data, data_name) \
            if fuse and _opset(model) >= 13 else 0
    _weights_as_inputs(graph, pairs)
    if fused:
        pack_qkv_into_attention(graph)
    _pick_logits_rows(graph, batch)
    model.metadata_props.append(onnx.StringStringEntryProto(key="loraplex.lora_bank", value=str(REWRITE_VERSION)))
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")  # two servers may start at once
    onnx.save(model, str(tmp))
    if fused:
        os.replace(data_tmp, out_path.with_name(data_name))  # the same bytes whoever writes them
    else:
        data_tmp.unlink()
    write_gather_graph(pairs, gather_graph_path(out_path), max(_opset(model), 13))
    os.replace(tmp, out_path)
    return pairs


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _lora_names(pairs: list[LoraPair]) -> set[str]:
    return {n for p in pairs for n in (p.a.name, p.b.name)}


def _check_lora_consumers(graph, pairs: list[LoraPair]) -> None:
    """Every LoRA input must feed exactly one MatMul, as its right-hand operand."""
    consumers: dict[str, list] = {name: [] for name in _lora_names(pairs)}
    for node in graph.node:
        for name in node.input:
            if name in consumers:
                consumers[name].append(node)
    for name, nodes in consumers.items():
        if len(nodes) != 1 or nodes[0].op_type != "MatMul" or list(nodes[0].input).index(name) != 1:
            raise LoraBankError(
                f"LoRA input {name} feeds {[n.op_type for n in nodes]}; the rewrite expects exactly one MatMul "
                "taking it as the right-hand operand (builder + ExtractAdapters graphs have that form)"
            )


def _weights_as_inputs(graph, pairs: list[LoraPair]) -> None:
    """Replace each per-adapter LoRA input (and its zero-rank default) by a per-step weights input
    `[slot_rows, ...]` of the same name, which the LoRA MatMul (now batched by shape alone) reads."""
    from onnx import TensorProto, helper

    lora = _lora_names(pairs)
    kept, seen = [], set()
    for inp in graph.input:
        if inp.name not in lora and inp.name not in seen:
            seen.add(inp.name)
            kept.append(inp)
    inits = [i for i in graph.initializer if i.name not in lora]
    # Also the shapes recorded for the lora_A MatMuls' outputs: the builder wrote them with the rank
    # of the adapter it baked in (a fixed number), so the memory planner would size those buffers by
    # it; without them ONNX Runtime infers `[batch, seq, lora_r_<i>]` from each input.
    rank_outputs = {out for node in graph.node if any(n in lora and ".lora_A." in n for n in node.input)
                    for out in node.output}
    vinfo = [v for v in graph.value_info if v.name not in lora and v.name not in rank_outputs]
    for field, values in ((graph.input, kept), (graph.initializer, inits), (graph.value_info, vinfo)):
        del field[:]
        field.extend(values)
    for spec, dims in _weight_dims(pairs, SLOT_ROWS_DIM):
        graph.input.append(helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, dims))


def _weight_dims(pairs: list[LoraPair], first: str) -> list[tuple]:
    """(LoRA input, its dims with `first` ahead and the pair's own symbolic rank) for every input."""
    found = []
    for index, p in enumerate(pairs):
        rank = f"{RANK_DIM}_{index}"
        found += [(p.a, [first, p.in_features, rank]), (p.b, [first, rank, p.out_features])]
    return found


def write_gather_graph(pairs: list[LoraPair], out_path: Path, opset: int) -> None:
    """The gather graph: each bank `[lora_slots, ...]` (named as its LoRA input) and `adapter_slot
    [rows]` in, each bank's rows `[rows, ...]` out (named `<input>/rows`)."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(SLOT_INPUT, TensorProto.INT64, [SLOT_ROWS_DIM])]
    outputs, nodes = [], []
    for (spec, bank_dims), (_, row_dims) in zip(_weight_dims(pairs, SLOTS_DIM), _weight_dims(pairs, SLOT_ROWS_DIM),
                                                strict=True):
        inputs.append(helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, bank_dims))
        outputs.append(helper.make_tensor_value_info(spec.name + GATHERED_SUFFIX, TensorProto.FLOAT, row_dims))
        nodes.append(helper.make_node("Gather", [spec.name, SLOT_INPUT], [spec.name + GATHERED_SUFFIX],
                                      name=f"/lora_bank/{spec.name}/Gather", axis=0))
    graph = helper.make_graph(nodes, "loraplex_gather", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out_path)


def gather_graph_path(banked: Path) -> Path:
    """The gather graph written beside the banked graph `banked`."""
    return banked.with_name(banked.name.removesuffix(".onnx").removesuffix(".batched") + GATHER_SUFFIX)


def _pick_logits_rows(graph, batch: str) -> None:
    """Make the LM head compute only positions `logits_index[i, :]` of each row i (see module doc)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(LOGITS_OUTPUT)
    while node is not None and node.op_type in _ELEMENTWISE:  # scaling/softcap after the head
        node = producer.get(node.input[0])
    if node is None or node.op_type not in _HEAD_OPS:
        raise LoraBankError(
            f"cannot find the LM head MatMul feeding '{LOGITS_OUTPUT}' (found {node.op_type if node else None}); "
            "export the package with `loraplex export`"
        )
    hidden = node.input[0]
    axes = "/lora_bank/logits_rows/axes"
    graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), axes))
    index_3d, rows = (f"/lora_bank/logits_rows/{n}" for n in ("index", "gather"))
    # [batch, positions] -> [batch, positions, 1]; GatherND (batch_dims 1) on [batch, seq, hidden]
    # gives [batch, positions, hidden].
    new_nodes = [
        helper.make_node("Unsqueeze", [LOGITS_INDEX_INPUT, axes], [index_3d], name="/lora_bank/logits_rows/Unsqueeze"),
        helper.make_node("GatherND", [hidden, index_3d], [rows], name="/lora_bank/logits_rows/GatherND", batch_dims=1),
    ]
    node.input[0] = rows
    position = list(graph.node).index(node)
    for offset, extra in enumerate(new_nodes):
        graph.node.insert(position + offset, extra)
    graph.input.append(helper.make_tensor_value_info(LOGITS_INDEX_INPUT, TensorProto.INT64,
                                                     [batch, LOGITS_POSITIONS_DIM]))
    for out in graph.output:
        if out.name == LOGITS_OUTPUT:
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_param = LOGITS_POSITIONS_DIM


def _link_external_data(model, source_dir: Path, out_dir: Path) -> None:
    """Hard-link the model's external data files into `out_dir` so a graph written there shares them.

    Not symlinks: onnxruntime resolves them and refuses data outside the model's directory. On
    another filesystem a hard link is impossible and the file is copied (once, with a warning).
    """
    from onnx import TensorProto

    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for location in locations:
        link, target = out_dir / location, source_dir / location
        if link.exists() and os.path.samefile(link, target):
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            os.link(target, link)
        except OSError:
            log.warning("copying %s to %s: cannot hard-link across filesystems", target, out_dir)
            shutil.copyfile(target, link)


def default_cache_dir(model_path: Path) -> Path:
    """Where the banked graph goes when the package directory is read-only."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:16]
    return root / "loraplex" / "banked" / key


def _fingerprint(model_path: Path) -> str:
    st = model_path.stat()
    key = f"{REWRITE_VERSION}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_batched_model(model_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The banked graph for `model_path`, rewritten on first use and cached.

    `<dir>/model.onnx` -> `<dir>/model.batched.onnx`, or into `cache_dir` when given, or into
    `default_cache_dir()` when the package directory is read-only (external data is then
    hard-linked, not copied). A stamp file records the source (size, mtime) and rewrite version,
    so a re-exported package is rewritten again.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found: is the package complete?")
    if cache_dir is not None:
        return _ensure_in(model_path, Path(cache_dir))
    try:
        return _ensure_in(model_path, model_path.parent)
    except OSError:  # read-only package directory
        return _ensure_in(model_path, default_cache_dir(model_path))


def _ensure_in(model_path: Path, out_dir: Path) -> Path:
    stem = model_path.name.removesuffix(".onnx")
    out, stamp = out_dir / (stem + BATCHED_SUFFIX), out_dir / (stem + _STAMP_SUFFIX)
    want = _fingerprint(model_path)
    if out.is_file() and stamp.is_file() and gather_graph_path(out).is_file():
        try:
            if json.loads(stamp.read_text()).get("source") == want:
                return out
        except json.JSONDecodeError:
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = rewrite_for_banks(model_path, out)
    record = json.dumps({"source": want, "rewrite_version": REWRITE_VERSION, "pairs": len(pairs)}) + "\n"
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(record)
    os.replace(tmp, stamp)
    return out
