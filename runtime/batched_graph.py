"""What the batched engine reads about a package: genai_config, the manifest's graph file and
rank, and the LoRA bank inputs of the banked graph."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort


def read_genai_config(package_dir: Path) -> dict:
    path = package_dir / "genai_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {package_dir} a package written by `loraplex export`?")
    return json.loads(path.read_text())["model"]


def model_file_and_rank(package_dir: Path, decoder: dict) -> tuple[str, int]:
    """The graph file and LoRA rank from the manifest when there is one, else from genai_config."""
    from loraplex.adapters.manifest import MANIFEST_NAME, Manifest

    if (package_dir / MANIFEST_NAME).is_file():
        manifest = Manifest.load(package_dir)
        return manifest.model_file, int(manifest.lora_rank)
    return decoder["filename"], 1


def bank_shapes(session: ort.InferenceSession) -> dict[str, tuple[int, int]]:
    """LoRA bank inputs of the banked graph: name -> (in, 0) for A banks, (0, out) for B banks."""
    shapes = {}
    for inp in session.get_inputs():
        if ".lora_A." in inp.name:
            shapes[inp.name] = (int(inp.shape[1]), 0)
        elif ".lora_B." in inp.name:
            shapes[inp.name] = (0, int(inp.shape[2]))
    return shapes
