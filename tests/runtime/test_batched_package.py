"""A package for the batched-engine tests, and onnxruntime-genai reference tokens for it.

Uses the shared `tiny_package` fixture when tests/fixtures/packages.py provides one; until then
it builds a package by hand (onnxruntime-genai builder + Olive ExtractAdapters, as the export
stage does) with three adapter files of different ranks and modules, zero-padded to the
graph's rank: "alpha" r=4 q/v, "beta" r=8 all projections, "gamma" r=16 MLP only.

The module holds no tests: test_lora_bank.py and test_batched_engine.py import from it, and the
builders are cached per process so the package is built once however many modules use it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAND_ADAPTERS = {  # name -> (rank, modules)
    "alpha": (4, ["q_proj", "v_proj"]),
    "beta": (8, ALL_PROJECTIONS),
    "gamma": (16, ["gate_proj", "up_proj", "down_proj"]),
}
GRAPH_RANK = 16


@dataclass(frozen=True)
class BankPackage:
    root: Path
    model: Path  # the package's graph (LoRA weights as inputs)
    adapters: dict[str, Path]  # name -> .onnx_adapter file


def _module_of(input_name: str) -> str:
    # model.layers.0.attn.q_proj.lora_A.MatMul.weight -> q_proj
    return input_name.split(".lora_")[0].rsplit(".", 1)[-1]


def write_random_adapter(model: Path, out: Path, rank: int, modules: list[str], seed: int) -> Path:
    """An adapter file for `model` at the graph's rank: `rank` random columns on `modules`, zeros elsewhere."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    graph = onnx.load(str(model), load_external_data=False).graph
    params = {}
    for inp in graph.input:
        if ".lora_" not in inp.name or inp.name in params:
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        is_a = ".lora_A." in inp.name
        shape = (dims[0], GRAPH_RANK) if is_a else (GRAPH_RANK, dims[1])
        value = np.zeros(shape, dtype=np.float32)
        if _module_of(inp.name) in modules:
            if is_a:
                value[:, :rank] = rng.normal(0, 0.3, (shape[0], rank))
            else:
                value[:rank, :] = rng.normal(0, 0.3, (rank, shape[1]))
        params[inp.name] = ort.OrtValue.ortvalue_from_numpy(value)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    adapter.export_adapter(str(out))
    return out


def build_hand_package(work: Path, base: Path) -> BankPackage:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    union = work / "union_adapter"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=GRAPH_RANK, lora_alpha=GRAPH_RANK, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(union)
    del model

    from onnxruntime_genai.models import builder

    built, cache = work / "built", work / "cache"
    extra = [f"adapter_path={union}"]
    opts = builder.parse_extra_options(None, str(base), str(built), "fp32", "cpu", str(cache), extra)
    builder.create_model(None, str(base), str(built), "fp32", "cpu", str(cache), **opts)

    from olive.workflows import run

    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    extracted = work / "extracted"
    run({
        "input_model": {"type": "ONNXModel", "model_path": str(built / "model.onnx")},
        "passes": {"e": {"type": "ExtractAdapters", "make_inputs": True, "dynamic_lora_r": True,
                         "save_format": "onnx_adapter"}},
        "output_dir": str(extracted),
        "log_severity_level": 3,
    })
    root = work / "package"
    (root / "adapters").mkdir(parents=True)
    shutil.copy(extracted / "model.onnx", root / "model.onnx")
    for side in built.iterdir():
        if side.suffix in (".json",) or side.name.startswith("tokenizer"):
            shutil.copy(side, root / side.name)
    adapters = {
        name: write_random_adapter(root / "model.onnx", root / "adapters" / f"{name}.onnx_adapter", rank, mods, seed)
        for seed, (name, (rank, mods)) in enumerate(HAND_ADAPTERS.items(), start=1)
    }
    return BankPackage(root=root, model=root / "model.onnx", adapters=adapters)


def package_from_manifest(root: Path) -> BankPackage:
    data = json.loads((root / "manifest.json").read_text())
    adapters = {name: root / entry["file"] for name, entry in data["adapters"].items()}
    return BankPackage(root=root, model=root / data["model_file"], adapters=adapters)


_built: dict[Path, BankPackage] = {}


def bank_package(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BankPackage:
    """The shared tiny_package when it exists, else the hand-built one (built once per process)."""
    try:
        return package_from_manifest(Path(request.getfixturevalue("tiny_package")))
    except pytest.FixtureLookupError:
        pass
    base = Path(request.getfixturevalue("tiny_base"))
    if base not in _built:
        _built[base] = build_hand_package(tmp_path_factory.mktemp("batched_package"), base)
    return _built[base]


@functools.cache
def genai_reference(root: Path, adapter_file: Path | None, prompt: tuple[int, ...], max_new_tokens: int,
                    repetition_penalty: float = 1.0) -> list[int]:
    """Greedy completion tokens from onnxruntime-genai itself (EOS excluded), the engines' reference."""
    import onnxruntime_genai as og

    model = _genai_model(root)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens, batch_size=1,
                              repetition_penalty=repetition_penalty)
    generator = og.Generator(model, params)
    if adapter_file is not None:
        adapters = _genai_adapters(root)
        name = adapter_file.stem
        if name not in _loaded.setdefault(root, set()):
            adapters.load(str(adapter_file), name)
            _loaded[root].add(name)
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(list(prompt))
    eos = _eos_ids(root)
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token in eos:
            break
        tokens.append(token)
    del generator
    return tokens


_loaded: dict[Path, set[str]] = {}


@functools.cache
def _genai_model(root: Path):
    import onnxruntime_genai as og

    return og.Model(str(root))


@functools.cache
def _genai_adapters(root: Path):
    import onnxruntime_genai as og

    return og.Adapters(_genai_model(root))


def _eos_ids(root: Path) -> set[int]:
    eos = json.loads((root / "genai_config.json").read_text())["model"]["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])
