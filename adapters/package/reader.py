"""`Package`: a package directory opened once: manifest, genai_config and the graph's LoRA inputs.

The server reads a package through this at start and hands it to the registry and the engines,
so nothing downstream re-reads the manifest, the config or the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.package.genai_config import GenaiConfig
from loraplex.adapters.package.lora_inputs import LoraInputs, read_lora_inputs
from loraplex.adapters.package.manifest import ADAPTER_DIR, Manifest, ManifestError


@dataclass(frozen=True)
class Package:
    root: Path
    manifest: Manifest
    config: GenaiConfig
    lora_inputs: LoraInputs

    @classmethod
    def open(cls, package_dir: str | Path, manifest: Manifest | None = None) -> Package:
        """Read the package; `manifest` stands in for manifest.json (export verifies before writing it)."""
        root = Path(package_dir).resolve()
        manifest = manifest or Manifest.load(root)
        if manifest.lora_graph_inputs is not None:  # schema 3: no graph parse (and no `import onnx`) at start
            try:
                inputs = LoraInputs.from_records(manifest.lora_graph_inputs)
            except ValueError as exc:
                raise ManifestError(str(exc)) from exc
        else:
            inputs = read_lora_inputs(root / manifest.model_file)
        return cls(root, manifest, GenaiConfig.load(root), inputs)

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    @property
    def adapter_dir(self) -> Path:
        return self.root / ADAPTER_DIR

    def adapter_path(self, name: str) -> Path:
        """The file of a manifest adapter."""
        return (self.root / self.manifest.adapters[name].file).resolve()
