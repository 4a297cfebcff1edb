"""One LoRA branch per group of projections that read the same input, over per-slot banks.

The exported graph has a branch per adapted projection, `(x @ A_m) @ B_m` added to the projection's
output. After `fusion` the projections that read one input (q/k/v, gate/up) are one MatMul and a
Split; their LoRA branches still read that input one by one. Here the branches of such a group
become one branch over the fused output, before its Split:

    A_g = [A_q | A_k | A_v]                          [in, r_q + r_k + r_v]
    B_g = block-diagonal: rows of m, columns of m    [r_q + r_k + r_v, q + k + v]
    fused + (x @ A_g) @ B_g  ->  Split  ->  q, k, v (each with its own adapter delta)

Exact: the extra terms are products with zeros (x @ A_m's columns meet only B_m's rows, and only in
m's output columns). In the banked graph each group's two banks are Gathered by `adapter_slot`:

    A rows = Gather(A_g bank [slots, in, r_g], slot); B rows = Gather(B_g bank [slots, r_g, width], slot)

so a layer with q/k/v/o adapted runs 10 LoRA nodes instead of 20 (each a few microseconds of
onnxruntime's per-node cost at decode time, more than their arithmetic). A branch whose
projection was not fused keeps its own Add and forms a group of one (the old per-pair form).

`LoraGroup` is the bank layout the engine fills (`bank.WeightBank`): members in column order, each
taking `rank` columns of A_g and rows of B_g (the bank's rank for that module, which grows as
adapters arrive; a module no adapter adapts takes none).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from loraplex.adapters.package.lora_inputs import LoraPair

BANK_PREFIX = "lora_bank"  # graph inputs lora_bank.<group>.A / .B


class LoraGroupError(ValueError):
    """The graph's LoRA branches do not have the structure the rewrite expects."""


@dataclass(frozen=True)
class GroupMember:
    """One adapted projection of a group: its LoRA input names and its output columns in the group."""

    module: str
    a_name: str
    b_name: str
    column: int
    out_features: int


@dataclass(frozen=True)
class LoraGroup:
    index: int
    in_features: int
    width: int  # output columns of the group's delta (the fused projection's, or the one member's)
    members: tuple[GroupMember, ...]  # in column order

    @property
    def a_input(self) -> str:
        return f"{BANK_PREFIX}.{self.index}.A"

    @property
    def b_input(self) -> str:
        return f"{BANK_PREFIX}.{self.index}.B"

    def to_record(self) -> dict:
        return {"index": self.index, "in": self.in_features, "width": self.width,
                "members": [[m.module, m.a_name, m.b_name, m.column, m.out_features] for m in self.members]}

    @classmethod
    def from_record(cls, record: dict) -> LoraGroup:
        members = tuple(GroupMember(*m) for m in record["members"])
        return cls(record["index"], record["in"], record["width"], members)


@dataclass
class _Branch:
    pair: LoraPair
    node_a: object  # x @ A
    node_b: object  # (x @ A) @ B
    add: object | None  # base + delta, when the delta feeds exactly one Add
    base: str | None  # the Add's other input


def group_branches(graph, pairs: list[LoraPair], slot_input: str, slots_dim: str, rank_dim: str) -> list[LoraGroup]:
    """Rewrite every LoRA branch of `graph` into its group's banked branch (see the module doc); the
    pairs' inputs must already be gone from the graph. Adds the group bank inputs; returns the groups."""
    from onnx import TensorProto, helper

    consumers: dict[str, list] = defaultdict(list)
    producer: dict[str, object] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    branches = [_branch(pair, consumers) for pair in pairs]
    by_input: dict[str, list[_Branch]] = defaultdict(list)
    for branch in branches:
        by_input[branch.node_a.input[0]].append(branch)
    inits = {init.name: init for init in graph.initializer}

    groups: list[LoraGroup] = []
    emit_at: dict[int, list] = {}  # id of a node replaced -> the nodes that take its place
    drop: set[int] = set()
    for x, members in by_input.items():
        split = _common_split(members, producer, consumers, inits)
        if split is None:
            parts = [[b] for b in members]
        else:
            order = list(split.output)
            parts = [sorted(members, key=lambda b: order.index(b.base))]
        for part in parts:
            group, nodes = _group_nodes(len(groups), x, part, split if len(part) > 1 else None, inits, slot_input)
            groups.append(group)
            emit_at[id(part[0].node_a)] = nodes
            drop.update(id(n) for b in part for n in (b.node_a, b.node_b))
            if len(part) > 1:
                drop.update(id(b.add) for b in part)
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(emit_at.get(id(node), ()))
        if id(node) not in drop:
            new_nodes.append(node)
    for group in groups:
        rank = f"{rank_dim}_{group.index}"
        graph.input.append(helper.make_tensor_value_info(group.a_input, TensorProto.FLOAT,
                                                         [slots_dim, group.in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(group.b_input, TensorProto.FLOAT,
                                                         [slots_dim, rank, group.width]))
    available = {i.name for i in graph.input} | set(inits)
    sorted_nodes = _toposort(new_nodes, available)
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    # Shapes recorded for tensors that are gone or now rank-dependent would mislead the memory planner.
    produced = {out for node in graph.node for out in node.output}
    vinfo = [v for v in graph.value_info if v.name in produced and not v.name.startswith(f"/{BANK_PREFIX}/")]
    del graph.value_info[:]
    graph.value_info.extend(vinfo)
    return groups


def _branch(pair: LoraPair, consumers: dict[str, list]) -> _Branch:
    node_a, node_b = consumers[pair.a.name][0], consumers[pair.b.name][0]
    if node_b.input[0] != node_a.output[0] or len(consumers[node_a.output[0]]) != 1:
        raise LoraGroupError(f"{pair.module}: its lora_B MatMul does not read its lora_A MatMul's output alone")
    users = consumers[node_b.output[0]]
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
    base = None
    if add is not None:
        others = [name for name in add.input if name != node_b.output[0]]
        base = others[0] if len(others) == 1 else None
    return _Branch(pair, node_a, node_b, add, base)


def _common_split(members: list[_Branch], producer: dict, consumers: dict, inits: dict):
    """The Split (of a fused projection, on the last axis, sizes constant) whose outputs are every
    member's base, read by nothing but the member's Add; None if the members do not share one."""
    if len(members) < 2 or any(b.add is None or b.base is None or len(consumers[b.base]) != 1 for b in members):
        return None
    split = producer.get(members[0].base)
    if split is None or split.op_type != "Split" or len(split.input) < 2 or split.input[1] not in inits:
        return None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if axis != -1 or any(producer.get(b.base) is not split for b in members):
        return None
    return split


def _group_nodes(index: int, x: str, part: list[_Branch], split, inits: dict, slot_input: str):
    """The group's layout and its nodes: Gather both banks by slot, two MatMuls, and for a fused group
    the Add before the Split (whose outputs take the names of the members' Adds)."""
    import numpy as np
    from onnx import helper, numpy_helper

    pairs = [b.pair for b in part]
    if split is None:
        members = (GroupMember(pairs[0].module, pairs[0].a.name, pairs[0].b.name, 0, pairs[0].out_features),)
        width = pairs[0].out_features
    else:
        sizes = numpy_helper.to_array(inits[split.input[1]]).tolist()
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        order = list(split.output)
        members = tuple(GroupMember(b.pair.module, b.pair.a.name, b.pair.b.name, int(starts[order.index(b.base)]),
                                    b.pair.out_features) for b in part)
        width = int(sum(sizes))
    group = LoraGroup(index, pairs[0].in_features, width, members)
    prefix = f"/{BANK_PREFIX}/{index}"
    a_rows, b_rows, t = f"{prefix}/A_rows", f"{prefix}/B_rows", f"{prefix}/xA"
    delta = part[0].node_b.output[0] if split is None else f"{prefix}/delta"
    nodes = [
        helper.make_node("Gather", [group.a_input, slot_input], [a_rows], name=f"{prefix}/GatherA", axis=0),
        helper.make_node("MatMul", [x, a_rows], [t], name=f"{prefix}/MatMulA"),
        helper.make_node("Gather", [group.b_input, slot_input], [b_rows], name=f"{prefix}/GatherB", axis=0),
        helper.make_node("MatMul", [t, b_rows], [delta], name=f"{prefix}/MatMulB"),
    ]
    if split is not None:
        total = f"{prefix}/sum"
        nodes.append(helper.make_node("Add", [split.input[0], delta], [total], name=f"{prefix}/Add"))
        split.input[0] = total
        for b in part:
            split.output[list(split.output).index(b.base)] = b.add.output[0]
    return group, nodes


def _toposort(nodes: list, available: set[str]) -> list:
    """`nodes` in an order where each runs after what it reads (stable: the given order where it can)."""
    ready = set(available) | {""}
    done: list = []
    waiting = list(nodes)
    while waiting:
        progress, rest = False, []
        for node in waiting:
            if all(name in ready for name in node.input):
                done.append(node)
                ready.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            raise LoraGroupError(f"the rewritten graph has a cycle or a missing input near {rest[0].name}")
        waiting = rest
    return done
