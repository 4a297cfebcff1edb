"""The LoRA bank rewrite: slot k of the banked graph computes what the original graph computes
with adapter k's weights as its LoRA inputs, for every row of a mixed batch."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from loraplex.runtime.engines.batched.graph import (
    GATHERED_SUFFIX,
    LOGITS_INDEX_INPUT,
    SLOT_INPUT,
    LoraBankError,
    ensure_batched_model,
    gather_graph_path,
    rewrite_for_banks,
)

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


def _prompt_feeds(package: PackageFiles, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A first prompt: empty past (head size from genai_config: the graph's dim is symbolic)."""
    decoder = json.loads((package.root / "genai_config.json").read_text())["model"]["decoder"]
    empty = np.zeros((ids.shape[0], decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for layer in range(decoder["num_hidden_layers"]):
        feeds[f"past_key_values.{layer}.key"] = feeds[f"past_key_values.{layer}.value"] = empty
    return feeds


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _gathered(package: PackageFiles, banks: dict[str, np.ndarray], slots: np.ndarray) -> dict[str, np.ndarray]:
    """Each row's slot of every bank, by the gather graph written beside the banked one (as the engine does)."""
    gather = _session(gather_graph_path(ensure_batched_model(package.model)))
    names = list(banks)
    got = gather.run([n + GATHERED_SUFFIX for n in names], {**banks, SLOT_INPUT: slots})
    return dict(zip(names, got, strict=True))


def test_rewrite_turns_each_lora_pair_into_per_step_weights_and_writes_a_gather_graph(package):
    out = package.model.with_name("model.test_rewrite.onnx")  # beside the model: shares its external data
    rewrite_for_banks(package.model, out)
    original = onnx.load(str(package.model), load_external_data=False).graph
    banked = onnx.load(str(out), load_external_data=False).graph
    gather = onnx.load(str(gather_graph_path(out))).graph
    assert gather_graph_path(out).name == "model.test_rewrite.batched.gather.onnx"
    out.unlink()
    gather_graph_path(out).unlink()
    lora = sorted({i.name for i in original.input if ".lora_" in i.name})
    inputs = {i.name: _dims(i) for i in banked.input}
    assert SLOT_INPUT not in inputs and inputs[LOGITS_INDEX_INPUT] == ["batch_size", "logits_positions"]
    assert sorted(n for n in inputs if ".lora_" in n) == lora  # same names, now each step's weights
    for name in lora:
        dims = inputs[name]
        assert dims[0] == "slot_rows" and len(dims) == 3
        assert (dims[2] if ".lora_A." in name else dims[1]).startswith("lora_r_")  # each pair its own rank
    assert not any(i.name in lora for i in banked.initializer)  # zero-rank defaults gone
    assert not any(n.op_type == "Gather" and n.input[0] in lora for n in banked.node)  # the MatMuls read them
    layers = sum(1 for i in original.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    # + Unsqueeze, GatherND; per layer q/k/v (3 nodes) and gate/up (2) each become one MatMul and a Split
    assert len(banked.node) == len(original.node) + 2 - layers
    # The gather graph: each bank (its rank as in the banked graph) and the rows' slots in, each bank's rows out.
    gather_inputs = {i.name: _dims(i) for i in gather.input}
    assert gather_inputs.pop(SLOT_INPUT) == ["slot_rows"]
    assert gather_inputs == {name: ["lora_slots", *inputs[name][1:]] for name in lora}
    assert {o.name: _dims(o) for o in gather.output} == {name + GATHERED_SUFFIX: inputs[name] for name in lora}
    assert sorted((n.op_type, n.input[0], n.input[1]) for n in gather.node) == [("Gather", n, SLOT_INPUT) for n in lora]
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
    expected = [original.run(["logits"], {**feeds, **zero})[0][0]]
    expected += [original.run(["logits"], {**feeds, **w})[0][0] for w in weights]

    banks = {name: np.stack([zero[name]] + [w[name] for w in weights]) for name in zero}
    rows = len(expected)
    batch_feeds = {k: np.repeat(v, rows, axis=0) for k, v in _prompt_feeds(package, ids).items()}
    slots = np.arange(rows, dtype=np.int64)[::-1].copy()  # row i uses slot rows-1-i
    positions = np.array([[8, 2], [0, 0], [5, 7], [8, 8]][:rows], dtype=np.int64)  # what each row's head computes
    rows_weights = _gathered(package, banks, slots)
    for name, bank in banks.items():
        np.testing.assert_array_equal(rows_weights[name], bank[slots])
    got = banked.run(["logits"], {**batch_feeds, **rows_weights, LOGITS_INDEX_INPUT: positions})[0]
    assert got.shape == (rows, 2, expected[0].shape[-1])
    for row, slot in enumerate(slots):
        for column, position in enumerate(positions[row]):
            np.testing.assert_allclose(got[row, column], expected[slot][position], rtol=0, atol=1e-5)
    # Adapters really change the output, so the comparison above can fail.
    assert all(np.abs(expected[k] - expected[0]).max() > 1e-2 for k in range(1, rows))
    # One slot's weights for every row (`[1, ...]`): the same logits, bit for bit, as that slot given per row.
    for slot in range(rows):
        shared, per_row = ({**batch_feeds, **{name: bank[[slot] * n] for name, bank in banks.items()},
                            LOGITS_INDEX_INPUT: positions} for n in (1, rows))
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
    feeds = {**_prompt_feeds(package, ids), LOGITS_INDEX_INPUT: np.array([[3]])}
    for inp in beside.get_inputs():
        if ".lora_" in inp.name:
            fixed = [d if isinstance(d, int) else 1 for d in inp.shape]  # 1 row's (zeros), rank 1
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


def test_projections_reading_one_input_are_fused_into_one_matmul_and_a_split(package):
    fused_path, plain_path = (package.model.with_name(f"model.test_{kind}.onnx") for kind in ("fused", "plain"))
    rewrite_for_banks(package.model, fused_path)
    rewrite_for_banks(package.model, plain_path, fuse=False)
    original = onnx.load(str(package.model), load_external_data=False).graph
    banked = onnx.load(str(fused_path), load_external_data=False).graph
    fused, plain = _session(fused_path), _session(plain_path)
    for path in (fused_path, plain_path, fused_path.with_name("model.test_fused.fused.data"),
                 gather_graph_path(fused_path), gather_graph_path(plain_path)):
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
    groups = {tuple(outs) for outs in before.values() if len(outs) > 1}
    assert sorted(len(g) for g in groups) == sorted([2, 3] * (len(groups) // 2))  # q/k/v and gate/up per layer
    assert all(len(outs) == 1 for outs in after.values())  # one projection per input now
    assert {tuple(n.output) for n in banked.node if n.op_type == "Split"} == groups  # the original names, in order
    # Bit for bit: the base and an adapter in one batch, fused against unfused.
    rng = np.random.default_rng(1)
    ids = rng.integers(2, fused.get_outputs()[0].shape[-1], size=(2, 7), dtype=np.int64)
    weights_a = _adapter(package, package.adapters[sorted(package.adapters)[0]])
    banks = {name: np.stack([np.zeros_like(w), w]) for name, w in weights_a.items()}
    feeds = {**_prompt_feeds(package, ids), **{name: bank[[0, 1]] for name, bank in banks.items()},
             LOGITS_INDEX_INPUT: np.array([[6], [3]])}
    got, want = (s.run(["logits"], feeds)[0] for s in (fused, plain))
    assert np.array_equal(got, want)


def test_a_fused_qkv_without_lora_branches_goes_to_the_attention_packed(package):
    """With no LoRA branch adding to q/k/v, the attention reads the fused projection whole (key and
    value inputs empty, no Split): bit for bit what the Split gave it."""
    from loraplex.runtime.engines.batched.fusion import pack_qkv_into_attention

    banked_path = package.model.with_name("model.test_pack.onnx")
    rewrite_for_banks(package.model, banked_path)
    model = onnx.load(str(banked_path), load_external_data=False)
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.input[1] for n in attention)  # the recipe adapts q/k/v: nothing packed
    # The graph a package without q/k/v branches has: each attention input straight from the Split.
    producer = {out: n for n in graph.node for out in n.output}
    adds = [producer[node.input[i]] for node in attention for i in range(3)]
    for node in attention:
        for i in range(3):
            node.input[i] = next(x for x in producer[node.input[i]].input if producer[x].op_type == "Split")
    kept = [n for n in graph.node if all(n is not a for a in adds)]
    del graph.node[:]
    graph.node.extend(kept)
    paths = {kind: package.model.with_name(f"model.test_{kind}.onnx") for kind in ("split", "packed")}
    onnx.save(model, str(paths["split"]))
    splits = sum(n.op_type == "Split" for n in graph.node)
    assert pack_qkv_into_attention(graph) == len(attention)
    assert sum(n.op_type == "Split" for n in graph.node) == splits - len(attention)
    assert all(n.input[1] == n.input[2] == "" for n in graph.node if n.op_type == "GroupQueryAttention")
    onnx.save(model, str(paths["packed"]))
    try:
        sessions = {kind: _session(path) for kind, path in paths.items()}
    finally:
        for path in (*paths.values(), banked_path, banked_path.with_name("model.test_pack.fused.data"),
                     gather_graph_path(banked_path)):
            path.unlink(missing_ok=True)
    ids = np.array([[5, 17, 33, 2, 9]], dtype=np.int64)
    feeds = {**_prompt_feeds(package, ids), LOGITS_INDEX_INPUT: np.array([[4]])}
    for inp in sessions["split"].get_inputs():
        if ".lora_" in inp.name:
            feeds[inp.name] = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
    got, want = (sessions[k].run(["logits"], feeds)[0] for k in ("packed", "split"))
    assert np.array_equal(got, want)
