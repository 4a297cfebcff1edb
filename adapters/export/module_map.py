"""How PEFT module paths map onto the builder's LoRA graph inputs.

PEFT saves `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([r, in]); the
builder names the same branch `model.layers.N.attn.q_proj` (see loraplex.adapters.package.lora_inputs).
Fused projections (Phi-3's `qkv_proj` and `gate_up_proj`) are unpacked by the builder into q/k/v and
gate/up branches that share A and split B row-wise; the mapping below does the same.
"""

from __future__ import annotations

# PEFT module kind -> graph module kinds it becomes (in B's row order)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def graph_module_name(peft_module_path: str) -> str:
    """`model.layers.0.self_attn.q_proj` -> `model.layers.0.attn.q_proj` (builder naming)."""
    return peft_module_path.replace(".self_attn.", ".attn.")


def graph_kinds(peft_kind: str) -> tuple[str, ...]:
    """Graph module kinds a PEFT module kind becomes (fused projections unpack into several)."""
    return FUSED.get(peft_kind, (peft_kind,))
