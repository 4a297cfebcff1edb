"""Every supported architecture exports and verifies with three adapters of different ranks and targets.

Llama is covered by the session's `tiny_package`; Phi-3 has fused qkv_proj / gate_up_proj, which the
builder unpacks (shared A, B split row-wise) and the converter must split the same way.
"""

from __future__ import annotations

import pytest
from loraplex.adapters.package.manifest import Manifest

SPECS = {
    "qwen2": (("a", 4, ("q_proj", "v_proj"), 1), ("b", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
              ("c", 16, ("gate_proj", "up_proj", "down_proj"), 3)),
    "mistral": (("a", 2, ("k_proj",), 1), ("b", 8, ("q_proj", "o_proj", "down_proj"), 2),
                ("c", 12, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3)),
    "phi3": (("a", 4, ("qkv_proj",), 1), ("b", 8, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), 2),
             ("c", 16, ("gate_up_proj",), 3)),
}
GRAPH_KINDS = {
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "mistral": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "phi3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}


@pytest.mark.parametrize("architecture", sorted(SPECS))
def test_architecture_exports_and_verifies(architecture, package_factory):
    package = package_factory(SPECS[architecture], architecture=architecture)
    m = Manifest.load(package)
    assert m.base.model_type == architecture
    assert m.lora_rank == max(rank for _, rank, _, _ in SPECS[architecture])
    assert m.lora_modules == GRAPH_KINDS[architecture]
    assert {n: e.rank for n, e in m.adapters.items()} == {n: r for n, r, _, _ in SPECS[architecture]}
    assert {n: e.target_modules for n, e in m.adapters.items()} == {
        n: sorted(t) for n, _, t, _ in SPECS[architecture]}
    for parity in [*(e.parity for e in m.adapters.values()), m.base_parity]:
        assert parity.reference in ("pytorch-peft", "pytorch")
        assert parity.passed and parity.tokens_equal and parity.max_abs_logit_diff < 1e-3
    # adapters differ from each other and from the base on the same prompts
    assert len({str(p.tokens) for p in [*(e.parity for e in m.adapters.values()), m.base_parity]}) == 4
