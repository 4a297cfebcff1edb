"""What the server needs to know about a package, read once at start.

The manifest (loraplex.adapters.manifest, stdlib only) says what adapters there are; the graph
says which LoRA inputs exist and their shapes, which is what an adapter file must match. An
adapter file that loads into onnxruntime-genai but does not fit the graph only fails at the first
generation, so the registry checks files against `lora_shapes` before accepting them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.manifest import Manifest

# Graph inputs named like model.layers.0.attn.q_proj.lora_A.MatMul.weight (see DESIGN.md).
LORA_MARKERS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraInputShape:
    """One LoRA graph input: `fixed` is the non-rank dim (in for A, out for B)."""

    name: str
    kind: str  # "A" ([in, r]) or "B" ([r, out])
    fixed: int


@dataclass
class PackageInfo:
    root: Path
    manifest: Manifest
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    lora_shapes: dict[str, LoraInputShape] = field(default_factory=dict)

    @classmethod
    def load(cls, package_dir: str | Path) -> PackageInfo:
        root = Path(package_dir).resolve()
        manifest = Manifest.load(root)
        config_path = root / "genai_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: re-export the package with `loraplex export`")
        model = json.loads(config_path.read_text())["model"]
        eos = model.get("eos_token_id", [])
        return cls(
            root=root,
            manifest=manifest,
            context_length=int(model["context_length"]),
            vocab_size=int(model.get("vocab_size", 0)),
            eos_token_ids=list(eos) if isinstance(eos, list) else [int(eos)],
            lora_shapes=read_lora_shapes(root / manifest.model_file),
        )


def read_lora_shapes(model_path: Path) -> dict[str, LoraInputShape]:
    """The graph's LoRA inputs and their fixed dims, read without loading the weights."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes: dict[str, LoraInputShape] = {}
    for value in graph.input:
        if not any(marker in value.name for marker in LORA_MARKERS):
            continue
        dims = value.type.tensor_type.shape.dim
        kind = "A" if ".lora_A." in value.name else "B"
        fixed = dims[0].dim_value if kind == "A" else dims[1].dim_value
        shapes[value.name] = LoraInputShape(value.name, kind, int(fixed))
    return shapes


def check_adapter_file(path: Path, shapes: dict[str, LoraInputShape]) -> int:
    """Check an .onnx_adapter file against the graph's LoRA inputs; returns its (padded) rank.

    Raises ValueError naming the first mismatch: a missing or unknown input, a wrong dim, or
    ranks that differ between inputs (the graph has one symbolic `lora_r`).
    """
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as exc:  # onnxruntime raises a bare RuntimeError/Fail for a bad file
        raise ValueError(f"{path.name} is not an .onnx_adapter file ({exc})") from exc
    if not shapes:
        raise ValueError("the package graph has no LoRA inputs: re-export it with adapters")
    unknown = sorted(set(params) - set(shapes))
    if unknown:
        raise ValueError(f"{path.name} has {len(unknown)} weights the graph has no input for, e.g. {unknown[0]!r}")
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ValueError(f"{path.name} lacks {len(missing)} LoRA inputs of the graph, e.g. {missing[0]!r}")
    ranks: set[int] = set()
    for name, value in params.items():
        shape = list(value.shape())
        expect = shapes[name]
        if len(shape) != 2:
            raise ValueError(f"{name} has shape {shape}; LoRA weights are 2-D")
        fixed, rank = (shape[0], shape[1]) if expect.kind == "A" else (shape[1], shape[0])
        if fixed != expect.fixed:
            raise ValueError(f"{name} has shape {shape} but the graph expects {expect.fixed} on that axis")
        ranks.add(rank)
    if len(ranks) != 1:
        raise ValueError(f"{path.name} mixes ranks {sorted(ranks)}; every LoRA input must share one rank")
    return ranks.pop()
