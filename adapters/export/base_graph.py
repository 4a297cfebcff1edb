"""Base graph: the ONNX model whose LoRA weights are graph inputs, shared by every adapter.

Two steps, both in-process (docs/architecture.md, "Export"):
1. onnxruntime-genai's model builder, given a *synthetic* PEFT adapter that targets the union of
   all adapters' modules at the largest rank, bakes LoRA branches into the graph
   (`lora_A/MatMul -> lora_B/MatMul -> Add`). The synthetic weights are irrelevant: step 2 turns
   them into inputs. (Olive's own ModelBuilder pass is broken with onnxruntime-genai 0.18.)
2. Olive's ExtractAdapters pass turns those weights into inputs with one symbolic dim `lora_r`
   and zero-rank defaults: with no adapter bound the model computes exactly the base model.

For int4 the LoRA MatMuls are excluded from quantization (`nodes_to_exclude`): a quantized LoRA
MatMul has its rank baked in and adapters of any other rank would fail to load.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from loraplex.adapters.export.module_map import graph_kinds, graph_module_name
from loraplex.adapters.export.peft_adapter import PeftAdapter, load_peft_adapter
from loraplex.adapters.package.manifest import PRECISIONS

log = logging.getLogger(__name__)

# Builder execution provider per (precision, device); the genai_config provider is written later.
_BUILDER_EP = {"cpu": "cpu", "gpu": "cuda", "npu": "cpu"}
_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<kind>\w+)$")


class ExportError(RuntimeError):
    """A stage of the export failed; the message names the stage and carries the tool's own output."""


def offline_environment() -> None:
    """No hub look-ups and no telemetry."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OLIVE_DISABLE_TELEMETRY": "1",
    }.items():
        os.environ.setdefault(key, value)


_olive_telemetry_silenced = False


def silence_olive_telemetry() -> None:
    """Create Olive's telemetry singleton disabled, before any Olive code logs an event.

    Olive 0.13 logs a heartbeat when its `Telemetry` singleton is first built and only then reads
    OLIVE_DISABLE_TELEMETRY, so the heartbeat is queued anyway; offline, its exporter retries and
    the process then waits ~10 s at exit joining the exporter thread. Olive skips the heartbeat and
    disables itself when it sees a CI variable: build the singleton once under `CI=1`, then restore
    the environment. Later events go to the disabled logger and are dropped.
    """
    global _olive_telemetry_silenced
    if _olive_telemetry_silenced:
        return
    saved = os.environ.get("CI")
    os.environ["CI"] = "1"
    try:
        from olive.telemetry import Telemetry

        Telemetry()
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved
    _olive_telemetry_silenced = True


@contextlib.contextmanager
def _captured(stage: str):
    """Keep the builder's and Olive's chatter (prints, per-tensor progress bars) out of the console;
    show it only if the stage fails."""
    buffer = io.StringIO()
    noisy = [logging.getLogger(name) for name in ("onnxruntime", "olive", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in noisy]
    try:
        for logger in noisy:
            logger.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except Exception as exc:
        tail = buffer.getvalue()[-4000:]
        raise ExportError(f"{stage} failed: {exc}\n--- {stage} output (tail) ---\n{tail}") from exc
    finally:
        for logger, level in zip(noisy, levels, strict=True):
            logger.setLevel(level)


Int4Algo = Literal["default", "rtn", "k_quant"]


@dataclass(frozen=True)
class Int4Options:
    """The builder's weight-only int4 quantization (MatMulNBits) of the base weights.

    block_size: weights per quantization scale (16..256; smaller is more accurate and larger).
    accuracy_level: the precision MatMulNBits computes in on the CPU (4 = int8 activations, the
        builder's CPU default and fastest; 1 = fp32, slowest).
    algo: `rtn` (round to nearest, seconds; `for_base` falls back to `default`, ONNX Runtime's own
        round to nearest, where rtn cannot quantize a weight) or `k_quant` (llama.cpp-style search,
        minutes). `default` with an int8 LM head fails on tied embeddings (builder 0.18).
    symmetric: a scale per block only (True, the builder's default) or a scale and a zero point
        (False, loraplex's default). Measured on SmolLM2-135M (a review-sentiment adapter, 24 unseen
        examples, PyTorch 100%): symmetric 66.7%, asymmetric with the LM head in int8 95.8%;
        fp32 activations (accuracy level 1) did not help (58.3%). SmolLM2's weights come from a
        GGUF Q4_1 file (a scale and a minimum per block of 32), which asymmetric blocks of 32 can
        follow closely and symmetric ones cannot.
    lm_head_int8: keep the LM head (the last MatMul) in int8 instead of int4: +16 MiB on SmolLM2,
        and the builder cannot make an asymmetric int4 LM head for tied embeddings.
    """

    block_size: int = 32
    accuracy_level: int = 4
    algo: Int4Algo = "rtn"
    symmetric: bool = False
    lm_head_int8: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"int4 block size {self.block_size} is not one of 16, 32, 64, 128, 256")
        if self.accuracy_level not in (1, 2, 3, 4):
            raise ValueError(f"int4 accuracy level {self.accuracy_level} is not one of 1, 2, 3, 4")
        if self.algo not in ("default", "rtn", "k_quant"):
            raise ValueError(f"int4 algorithm {self.algo!r} is not one of default, rtn, k_quant")

    def for_base(self, base_dir: Path) -> Int4Options:
        """These options, with `rtn` replaced by `default` where the builder's rtn quantizer would fail:
        asymmetric with an odd number of blocks in some weight row (it packs two zero points a byte)."""
        if self.algo != "rtn" or self.symmetric:
            return self
        config = json.loads((base_dir / "config.json").read_text())
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        rows = (config["hidden_size"], heads * head_dim, config.get("intermediate_size", config["hidden_size"]))
        if all(-(-k // self.block_size) % 2 == 0 for k in rows):
            return self
        log.info("int4: asymmetric rtn cannot quantize rows of %s weights in blocks of %d; using the default "
                 "quantizer", rows, self.block_size)
        return replace(self, algo="default")

    def extra_options(self) -> list[str]:
        algo = f"{self.algo}_last" if self.lm_head_int8 and self.algo != "default" else self.algo
        options = [f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}",
                   f"algo_config={algo}", f"is_symmetric={str(self.symmetric).lower()}"]
        if self.lm_head_int8 and self.algo == "default":
            options.append("matmul_mixed_precision=last_matmul:int8")
        return options


@dataclass(frozen=True)
class LoraUnion:
    """What the base graph must have LoRA inputs for."""

    modules: tuple[str, ...]  # PEFT module paths (model.layers.0.self_attn.q_proj, ...)
    rank: int

    @classmethod
    def of(cls, adapters: list[PeftAdapter]) -> LoraUnion:
        if not adapters:
            raise ValueError("export needs at least one adapter: the graph's LoRA inputs come from them")
        paths = sorted({path for a in adapters for path in a.modules})
        return cls(tuple(paths), max(a.rank for a in adapters))

    @property
    def kinds(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p in self.modules})


def write_synthetic_adapter(base_dir: Path, union: LoraUnion, out_dir: Path, seed: int = 0) -> Path:
    """A PEFT adapter targeting every module of `union` at rank `union.rank`, with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # Exact module paths (not kinds) so an adapter restricted to some layers stays restricted.
    config = LoraConfig(r=union.rank, lora_alpha=union.rank, target_modules=list(union.modules),
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    del peft_model, model
    return out_dir


def lora_node_names(union: LoraUnion) -> list[str]:
    """Builder node names of every LoRA MatMul (`/model/layers.0/attn/q_proj/lora_A/MatMul`)."""
    names = []
    for path in union.modules:
        match = _LAYER_MODULE.match(graph_module_name(path))
        if not match:
            raise ExportError(f"module {path} is not a decoder-layer projection; cannot keep its LoRA in float")
        for kind in graph_kinds(match["kind"]):
            for ab in ("A", "B"):
                names.append(f"/model/layers.{match['layer']}/{match['block']}/{kind}/lora_{ab}/MatMul")
    return names


def build_lora_model(base_dir: Path, adapter_dir: Path, out_dir: Path, work_dir: Path, *,
                     precision: str = "fp32", device: str = "cpu", union: LoraUnion | None = None,
                     int4: Int4Options | None = None) -> Path:
    """Run the onnxruntime-genai builder with LoRA branches baked in; returns out_dir/model.onnx."""
    offline_environment()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device == "cpu":
        raise ValueError("fp16 needs a GPU target (--device gpu); use fp32 or int4 for CPU")
    extra = [f"adapter_path={adapter_dir}"]
    if precision == "int4":
        union = union or LoraUnion.of([load_peft_adapter(adapter_dir)])
        extra.append("nodes_to_exclude=" + ",".join(lora_node_names(union)))
        extra += (int4 or Int4Options()).for_base(base_dir).extra_options()
    from onnxruntime_genai.models import builder

    ep = _BUILDER_EP[device]
    cache = str(work_dir / "builder_cache")
    with _captured("onnxruntime-genai model builder"):
        options = builder.parse_extra_options(None, str(base_dir), str(out_dir), precision, ep, cache, extra)
        builder.create_model(None, str(base_dir), str(out_dir), precision, ep, cache, **options)
    return out_dir / "model.onnx"


def extract_adapters(model_path: Path, out_dir: Path, work_dir: Path) -> Path:
    """Olive ExtractAdapters, in-process: LoRA weights become inputs (symbolic `lora_r`, zero-rank
    defaults). Returns out_dir/model.onnx; Olive's adapter file is out_dir/adapter_weights.onnx_adapter."""
    offline_environment()
    with _captured("Olive ExtractAdapters"):
        silence_olive_telemetry()
        from olive.workflows import run as olive_run

        olive_run({
            "input_model": {"type": "ONNXModel", "model_path": str(model_path)},
            "passes": {"extract": {
                "type": "ExtractAdapters", "make_inputs": True, "dynamic_lora_r": True,
                "optional_inputs": True, "save_format": "onnx_adapter",
                "save_as_external_data": True, "all_tensors_to_one_file": True,
                "external_data_name": "model.onnx.data",
            }},
            "output_dir": str(out_dir),
            "cache_dir": str(work_dir / "olive_cache"),
            "log_severity_level": 3,
        })
    model = out_dir / "model.onnx"
    if not model.is_file():
        raise ExportError(f"Olive ExtractAdapters wrote no {model}; the builder graph may hold no LoRA MatMuls")
    dedupe_graph_inputs(model)
    return model


def dedupe_graph_inputs(model_path: Path) -> int:
    """Drop repeated graph inputs; returns how many were dropped.

    Olive 0.13's ExtractAdapters lists every LoRA input twice in `graph.input` (once when it turns
    the initializer into an input, once when it adds the zero-rank default). ONNX Runtime tolerates
    it, but the graph is not valid ONNX (`onnx.checker`: "not in single static assignment form") and
    graph rewriters trip on it. Only the graph proto is rewritten: external weights are untouched.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    seen: set[str] = set()
    unique = []
    for value in model.graph.input:
        if value.name not in seen:
            seen.add(value.name)
            unique.append(value)
    dropped = len(model.graph.input) - len(unique)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(unique)
        onnx.save(model, str(model_path))
    return dropped


# Files the builder writes next to the model that the package carries (tokenizer and genai config).
def package_side_files(built_dir: Path) -> list[Path]:
    return [p for p in sorted(built_dir.iterdir())
            if p.is_file() and not p.name.startswith("model.onnx")]


def copy_side_files(built_dir: Path, package_dir: Path) -> None:
    for src in package_side_files(built_dir):
        shutil.copy2(src, package_dir / src.name)
