"""Fewer, larger kernels: the base projections that read the same input become one MatMul.

A decoder layer runs seven projections; q/k/v read the same normalized hidden state, and so do the
MLP's gate and up. On a CPU at decode time each projection is a small matrix-vector product whose
cost is as much thread fork/join and per-node overhead as memory traffic (SmolLM2-135M int4: 211
MatMulNBits nodes at 50-70 us each, well below the copy bandwidth). Concatenating the weights of a
group along their output dimension gives one node per group and a Split after it (q/k/v and
gate/up: seven nodes per layer become four).

Exact: each output column of a MatMul (or MatMulNBits block-quantized weights, whose blocks run
along the input dimension) is computed from its own weight column alone, so the fused node gives
the same values bit for bit (checked by the engine's tests: greedy tokens equal onnxruntime-genai's
on the unfused graph, fp32 and int4). The LoRA branches are untouched: they read the same input and
add to the Split's outputs as before. Where no branch adds to q/k/v, GroupQueryAttention reads the
fused q/k/v packed, without the Split (`pack_qkv_into_attention`).

The fused weights are new initializers, written to their own external data file beside the
rewritten graph (the package's own weights stay as they are, for the genai engine).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"


def fuse_shared_input_projections(graph, model_dir: Path, data: BinaryIO, location: str) -> int:
    """Fuse every group of MatMul / MatMulNBits nodes that read the same input with constant weights
    of one layout; their weights are written to `data`, the external data file the rewritten model
    will find at `location` (relative to it). Returns the number of groups fused."""
    graph_inputs = {inp.name for inp in graph.input}  # an initializer that is also an input can be fed
    inits = {init.name: init for init in graph.initializer if init.name not in graph_inputs}
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.node:
        key = _group_key(node, inits)
        if key is not None:
            groups[key].append(node)
    fusable = [nodes for nodes in groups.values() if len(nodes) > 1]
    if not fusable:
        return 0
    replaced: dict[str, list] = {}  # first node of a group -> its fused node and split
    drop: set[str] = set()
    for nodes in fusable:
        fused = _fuse(nodes, inits, model_dir, _Data(data, location), graph)
        replaced[nodes[0].name] = fused
        drop.update(n.name for n in nodes)
    used = {name for node in graph.node if node.name not in drop for name in node.input}
    used |= {name for new in replaced.values() for node in new for name in node.input}
    new_nodes = []
    for node in graph.node:
        if node.name in replaced:
            new_nodes.extend(replaced[node.name])
        elif node.name not in drop:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(fusable)


def _group_key(node, inits: dict) -> tuple | None:
    """What nodes must share to be fused: their input, op and every attribute but N; None for a node
    that cannot be fused (a weight that is not a constant, a bias, g_idx)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            return None
        return ("MatMul", node.input[0], weight.data_type, weight.dims[0])
    if node.op_type == "MatMulNBits" and node.domain == _MS_DOMAIN:
        inputs = list(node.input)
        if len(inputs) > 4 or not all(name in inits for name in inputs[1:] if name):
            return None  # g_idx or bias, or weights computed in the graph
        attrs = tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N"))
        zero_points = len(inputs) > 3 and bool(inputs[3])
        return ("MatMulNBits", inputs[0], attrs, zero_points, inits[inputs[1]].data_type,
                inits[inputs[2]].data_type)
    return None


def _array(init, model_dir: Path):
    """An initializer's values, its external data read directly (onnx's own reader refuses a data
    file with several hard links, which is how a banked graph in another directory shares it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    info = {entry.key: entry.value for entry in init.external_data}
    path = (model_dir / info["location"]).resolve()
    if not path.is_relative_to(model_dir.resolve()):
        raise ValueError(f"initializer {init.name}: external data {info['location']!r} lies outside {model_dir}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
    count = int(np.prod(init.dims)) if init.dims else 1
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read(int(info.get("length", count * dtype.itemsize)))
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(init.dims))


class _Data:
    """The external data file being written: each initializer's bytes appended, aligned."""

    ALIGN = 64  # onnxruntime maps external data; aligned offsets keep every tensor's start aligned

    def __init__(self, file: BinaryIO, location: str):
        self.file, self.location = file, location

    def initializer(self, array, name: str):
        from onnx import TensorProto, external_data_helper, numpy_helper

        tensor = numpy_helper.from_array(array, name)
        raw = tensor.raw_data
        offset = -(-self.file.tell() // self.ALIGN) * self.ALIGN
        self.file.write(b"\0" * (offset - self.file.tell()))
        self.file.write(raw)
        external_data_helper.set_external_data(tensor, location=self.location, offset=offset, length=len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        return tensor


def _fuse(nodes: list, inits: dict, model_dir: Path, data: _Data, graph) -> list:
    """The fused node and the Split that gives each original node's output its own name."""
    import numpy as np
    from onnx import helper, numpy_helper

    name = f"/fused{nodes[0].name}"
    out = f"{name}/output_0"
    if nodes[0].op_type == "MatMul":
        weights = [_array(inits[n.input[1]], model_dir) for n in nodes]
        widths = [w.shape[1] for w in weights]
        graph.initializer.append(data.initializer(np.concatenate(weights, axis=1), f"{name}/weight"))
        fused = helper.make_node("MatMul", [nodes[0].input[0], f"{name}/weight"], [out], name=name)
    else:
        parts = [[_array(inits[n.input[i]], model_dir) for n in nodes] for i in range(1, len(nodes[0].input))]
        widths = [next(a.i for a in n.attribute if a.name == "N") for n in nodes]
        inputs = [nodes[0].input[0]]
        for i, arrays in enumerate(parts):  # B [N, blocks, blob]; scales, zero points: N-major, flat or 2-D
            joined = np.concatenate([a.reshape(width, -1) for a, width in zip(arrays, widths, strict=True)])
            shaped = joined.reshape(sum(widths), *arrays[0].shape[1:]) if arrays[0].ndim > 1 else joined.reshape(-1)
            inputs.append(f"{name}/input_{i + 1}")
            graph.initializer.append(data.initializer(shaped, inputs[-1]))
        attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
        attrs["N"] = sum(widths)
        fused = helper.make_node("MatMulNBits", inputs, [out], name=name, domain=_MS_DOMAIN, **attrs)
    sizes = f"{name}/split_sizes"
    graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), sizes))
    split = helper.make_node("Split", [out, sizes], [n.output[0] for n in nodes], name=f"{name}/Split", axis=-1)
    log.debug("fused %s into one %s of width %d", [n.name for n in nodes], fused.op_type, sum(widths))
    return [fused, split]


def pack_qkv_into_attention(graph) -> int:
    """Feed GroupQueryAttention the fused q/k/v projection whole, without its Split.

    GroupQueryAttention takes query, key and value packed in one tensor `[batch, seq, (heads +
    2 * kv_heads) * head_size]` when its key and value inputs are empty, which is exactly the fused
    projection's output (q, k, v side by side). Exact (the kernel reads the same values where the
    Split would have put them), and one node fewer per layer. Returns the number of Splits removed."""
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    drop = set()
    for node in graph.node:
        if node.op_type != "Split" or len(node.output) != 3:
            continue
        users = [consumers[name] for name in node.output]
        attention = users[0][0] if users[0] else None
        if attention is None or attention.op_type != "GroupQueryAttention" or attention.domain != _MS_DOMAIN:
            continue
        if any(len(u) != 1 or u[0] is not attention for u in users) or list(attention.input[:3]) != list(node.output):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != -1:
            continue
        attention.input[0] = node.input[0]
        attention.input[1] = attention.input[2] = ""
        drop.add(id(node))
    if drop:
        kept = [node for node in graph.node if id(node) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
    return len(drop)
