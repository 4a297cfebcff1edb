"""The LoRA bank rewrite: slot k of the banked graph computes what the original graph computes
with adapter k's weights as its LoRA inputs, for every row of a mixed batch; the projections (and
their LoRA branches) that read one input run as one."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from loraplex.runtime.engines.batched.graph import (
    LOGITS_INDEX_INPUT,
    SLOT_INPUT,
    LoraBankError,
    ensure_batched_model,
    lora_groups,
    rewrite_for_banks,
)
from loraplex.runtime.engines.batched.lora_groups import LoraGroup

from tests.fixtures.reference import PackageFiles, package_files


@pytest.fixture(scope="module")
def package(recipe_package) -> PackageFiles:
    return package_files(recipe_package)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _adapter(package: PackageFiles, path) -> dict[str, np.ndarray]:
    """An adapter's weights over every LoRA input at one rank (16: the largest here), as the plain
    graph must be fed (see loraplex.adapters.package.adapter_file)."""
    from loraplex.adapters.package.adapter_file import read_adapter_file
    from loraplex.adapters.package.lora_inputs import read_lora_inputs

    inputs = read_lora_inputs(package.model)
    weights = read_adapter_file(path, inputs)
    return {name: np.pad(t, ((0, 0), (0, 16 - t.shape[1])) if ".lora_A." in name else ((0, 16 - t.shape[0]), (0, 0)))
            for name, t in weights.padded(inputs).items()}


def _banks(groups: list[LoraGroup], slots: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Group banks holding `slots` (each an adapter as `_adapter` gives it, every member at rank 16):
    member j of a group takes A's columns and B's rows [16 j, 16 j + 16), B in its own output columns."""
    banks = {}
    for group in groups:
        a = np.zeros((len(slots), group.in_features, 16 * len(group.members)), np.float32)
        b = np.zeros((len(slots), 16 * len(group.members), group.width), np.float32)
        for s, weights in enumerate(slots):
            for j, m in enumerate(group.members):
                a[s, :, 16 * j: 16 * j + 16] = weights[m.a_name]
                b[s, 16 * j: 16 * j + 16, m.column: m.column + m.out_features] = weights[m.b_name]
        banks[group.a_input], banks[group.b_input] = a, b
    return banks


def _prompt_feeds(package: PackageFiles, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A first prompt: empty past (head size from genai_config: the graph's dim is symbolic)."""
    decoder = json.loads((package.root / "genai_config.json").read_text())["model"]["decoder"]
    empty = np.zeros((ids.shape[0], decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for layer in range(decoder["num_hidden_layers"]):
        feeds[f"past_key_values.{layer}.key"] = feeds[f"past_key_values.{layer}.value"] = empty
    return feeds


def test_rewrite_turns_each_lora_group_into_two_banks_and_adds_one_slot_input(package):
    out = package.model.with_name("model.test_rewrite.onnx")  # beside the model: shares its external data
    groups = rewrite_for_banks(package.model, out)
    original = onnx.load(str(package.model), load_external_data=False).graph
    banked = onnx.load(str(out), load_external_data=False).graph
    for path in (out, out.with_name("model.test_rewrite.fused.data")):
        path.unlink()
    lora = sorted({i.name for i in original.input if ".lora_" in i.name})
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in banked.input}
    assert inputs[SLOT_INPUT] == ["slot_rows"] and inputs[LOGITS_INDEX_INPUT] == ["batch_size", "logits_positions"]
    assert next(i for i in banked.input if i.name == SLOT_INPUT).type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert not any(name in inputs for name in lora) and not any(i.name in lora for i in banked.initializer)
    # Every LoRA pair is in exactly one group; q/k/v and gate/up (where adapted) share theirs.
    assert sorted(n for g in groups for m in g.members for n in (m.a_name, m.b_name)) == lora
    kinds = sorted(tuple(m.module.rsplit(".", 1)[-1] for m in g.members) for g in groups)
    layers = sum(1 for i in original.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    assert set(kinds) == {("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    assert len(kinds) == 4 * layers
    for group in groups:
        assert inputs[group.a_input] == ["lora_slots", group.in_features, f"lora_r_{group.index}"]
        assert inputs[group.b_input] == ["lora_slots", f"lora_r_{group.index}", group.width]
        assert sorted(m.column for m in group.members) == [m.column for m in group.members]  # column order
    gathers = [n for n in banked.node if n.op_type == "Gather" and n.input[1] == SLOT_INPUT]
    assert sorted(n.input[0] for n in gathers) == sorted(n for g in groups for n in (g.a_input, g.b_input))
    # Per group 4 LoRA nodes (2 Gathers, 2 MatMuls) replace 2 MatMuls per pair; a group of several adds one
    # Add before its Split and drops its members' Adds. Per layer q/k/v (3 nodes) become one MatMul read
    # packed by the attention (no Split), gate/up (2) one MatMul and a Split; + Unsqueeze, GatherND.
    adds = sum(1 - len(g.members) for g in groups if len(g.members) > 1)
    assert len(banked.node) == len(original.node) - len(lora) + 4 * len(groups) + adds - 2 * layers + 2
    assert sum(1 for n in banked.node if n.op_type == "Split") == layers  # gate/up only
    attention = [n for n in banked.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == layers and all(n.input[1] == n.input[2] == "" for n in attention)
    head = next(n for n in banked.node if n.name.startswith("/lm_head/"))
    assert head.input[0] == "/lora_bank/logits_rows/gather"


def test_slot_k_gives_the_logits_of_the_original_graph_with_adapter_k(package):
    """A batch of 4 rows, slots 0..3 = base, alpha, beta, gamma; each row against its own run."""
    names = sorted(package.adapters)
    weights = [_adapter(package, package.adapters[name]) for name in names]
    original = _session(package.model)
    banked = _session(ensure_batched_model(package.model))

    rng = np.random.default_rng(0)
    vocab = original.get_outputs()[0].shape[-1]
    ids = rng.integers(2, vocab, size=(1, 9), dtype=np.int64)
    feeds = _prompt_feeds(package, ids)
    rank = next(iter(weights[0].values())).shape[1]
    zero = {name: np.zeros(w.shape[:1] + (rank,) if ".lora_A." in name else (rank,) + w.shape[1:], np.float32)
            for name, w in weights[0].items()}
    assert rank == 16
    expected = [original.run(["logits"], {**feeds, **zero})[0][0]]
    expected += [original.run(["logits"], {**feeds, **w})[0][0] for w in weights]

    banks = _banks(lora_groups(ensure_batched_model(package.model)), [zero] + weights)
    rows = len(expected)
    batch_feeds = {k: np.repeat(v, rows, axis=0) for k, v in _prompt_feeds(package, ids).items()}
    slots = np.arange(rows, dtype=np.int64)[::-1].copy()  # row i uses slot rows-1-i
    positions = np.array([[8, 2], [0, 0], [5, 7], [8, 8]][:rows], dtype=np.int64)  # what each row's head computes
    got = banked.run(["logits"], {**batch_feeds, **banks, SLOT_INPUT: slots, LOGITS_INDEX_INPUT: positions})[0]
    assert got.shape == (rows, 2, expected[0].shape[-1])
    for row, slot in enumerate(slots):
        for column, position in enumerate(positions[row]):
            np.testing.assert_allclose(got[row, column], expected[slot][position], rtol=0, atol=1e-5)
    # Adapters really change the output, so the comparison above can fail.
    assert all(np.abs(expected[k] - expected[0]).max() > 1e-2 for k in range(1, rows))
    # One slot for every row (`adapter_slot` [1]): the same logits, bit for bit, as that slot given per row.
    for slot in range(rows):
        shared, per_row = ({**batch_feeds, **banks, SLOT_INPUT: np.full(n, slot), LOGITS_INDEX_INPUT: positions}
                           for n in (1, rows))
        assert np.array_equal(banked.run(["logits"], shared)[0], banked.run(["logits"], per_row)[0])


def test_cached_rewrite_is_reused_and_redone_when_the_graph_changes(package, tmp_path):
    for file in package.model.parent.glob(package.model.name + "*"):  # model.onnx (+ .data)
        shutil.copy(file, tmp_path / file.name)
    model = tmp_path / package.model.name
    first = ensure_batched_model(model)
    stamp = first.stat().st_mtime_ns
    assert ensure_batched_model(model) == first and first.stat().st_mtime_ns == stamp
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))  # "re-exported"
    ensure_batched_model(model)
    assert first.stat().st_mtime_ns != stamp


def test_banked_graph_in_another_directory_shares_the_external_data(package, tmp_path):
    """A read-only package gets its banked graph in a cache directory, weights linked, not copied."""
    cached = ensure_batched_model(package.model, cache_dir=tmp_path / "cache")
    assert cached.parent == tmp_path / "cache"
    for data in package.model.parent.glob(package.model.name + ".data"):  # the same file, not a copy
        assert os.path.samefile(data, cached.parent / data.name)
    beside = _session(ensure_batched_model(package.model))
    elsewhere = _session(cached)
    ids = np.array([[5, 17, 33, 2]], dtype=np.int64)
    feeds = {**_prompt_feeds(package, ids), SLOT_INPUT: np.zeros(1, np.int64), LOGITS_INDEX_INPUT: np.array([[3]])}
    for inp in beside.get_inputs():
        if inp.name.startswith("lora_bank."):
            fixed = [d if isinstance(d, int) else 1 for d in inp.shape]  # 1 slot (zeros), rank 1
            feeds[inp.name] = np.zeros(fixed, dtype=np.float32)
    np.testing.assert_array_equal(beside.run(["logits"], feeds)[0], elsewhere.run(["logits"], feeds)[0])


def test_graph_without_lora_inputs_is_refused_with_the_fix(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch_size", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(LoraBankError, match="no LoRA inputs.*export the package with at least one adapter"):
        rewrite_for_banks(tmp_path / "model.onnx", tmp_path / "model.batched.onnx")


def test_projections_reading_one_input_are_fused_and_the_result_is_bit_for_bit_the_unfused_one(package):
    fused_path, plain_path = (package.model.with_name(f"model.test_{kind}.onnx") for kind in ("fused", "plain"))
    fused_groups = rewrite_for_banks(package.model, fused_path)
    plain_groups = rewrite_for_banks(package.model, plain_path, fuse=False)
    original = onnx.load(str(package.model), load_external_data=False).graph
    banked = onnx.load(str(fused_path), load_external_data=False).graph
    fused, plain = _session(fused_path), _session(plain_path)
    for path in (fused_path, plain_path, fused_path.with_name("model.test_fused.fused.data")):
        path.unlink()
    weights = {i.name for i in original.initializer} - {i.name for i in original.input}

    def projections(graph) -> dict[str, list[str]]:
        """input -> outputs of the base MatMuls reading it (constant weights; not the LM head)"""
        found: dict[str, list[str]] = {}
        for n in graph.node:
            if n.op_type in ("MatMul", "MatMulNBits") and "lm_head" not in n.name and \
                    (n.input[1] in weights or n.name.startswith("/fused")):
                found.setdefault(n.input[0], []).extend(n.output)
        return found

    before, after = projections(original), projections(banked)
    groups = [outs for outs in before.values() if len(outs) > 1]
    assert sorted(len(g) for g in groups) == sorted([2, 3] * (len(groups) // 2))  # q/k/v and gate/up per layer
    assert all(len(outs) == 1 for outs in after.values())  # one projection per input now
    assert all(len(g.members) == 1 for g in plain_groups)  # unfused: each LoRA branch on its own
    assert len(fused_groups) < len(plain_groups)
    # Bit for bit: the base and an adapter in one batch, fused against unfused.
    rng = np.random.default_rng(1)
    ids = rng.integers(2, fused.get_outputs()[0].shape[-1], size=(2, 7), dtype=np.int64)
    weights_a = _adapter(package, package.adapters[sorted(package.adapters)[-1]])
    zero = {name: np.zeros_like(w) for name, w in weights_a.items()}
    feeds = {**_prompt_feeds(package, ids), SLOT_INPUT: np.array([0, 1]), LOGITS_INDEX_INPUT: np.array([[6], [3]])}
    got = fused.run(["logits"], {**feeds, **_banks(fused_groups, [zero, weights_a])})[0]
    want = plain.run(["logits"], {**feeds, **_banks(plain_groups, [zero, weights_a])})[0]
    assert np.array_equal(got, want)
