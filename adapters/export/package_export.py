"""`export_package` and `add_adapter`: the public API of the export stage.

A package (docs/architecture.md, "The package") is built in stages: base graph (builder + ExtractAdapters,
see `base_graph`), one `.onnx_adapter` per adapter (`convert`), the manifest, and parity checks
(`parity`). `add_adapter` adds or replaces one adapter without rebuilding the graph: what
hot-swapping a retrained adapter into a running server uses.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from loraplex.adapters.export import base_graph, convert, device_target, parity
from loraplex.adapters.export.convert import IncompatibleAdapter
from loraplex.adapters.export.module_map import graph_kinds
from loraplex.adapters.export.peft_adapter import AdapterError, PeftAdapter, load_peft_adapter
from loraplex.adapters.export.stages import StageTimer
from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX
from loraplex.adapters.package.lora_inputs import LoraInputs, read_lora_inputs
from loraplex.adapters.package.manifest import (
    ADAPTER_DIR,
    MANIFEST_NAME,
    MODEL_FILE,
    PRECISIONS,
    AdapterEntry,
    BaseModelInfo,
    Manifest,
    ManifestError,
    Parity,
    check_adapter_name,
    file_sha256,
)

log = logging.getLogger(__name__)
INCOMPLETE_MARKER = ".export-incomplete"
# Max |logit difference| vs the fp32 export, in units of the fp32 logits' standard deviation (the
# absolute value used is recorded as Parity.tolerance). Measured on the tiny random-init models:
# int4 ~0.8 (block-32 int4 of random weights is the worst case: no outliers, small logit spread),
# fp16 ~0.002.
REFERENCE_TOLERANCE = {"int4": 1.25, "fp16": 0.05}


def _base_info(base_dir: Path) -> BaseModelInfo:
    from loraplex.trainer.base_model import base_identity

    ident = base_identity(base_dir)
    return BaseModelInfo(architecture=ident["architecture"], model_type=ident["model_type"],
                         source=ident["path"], sha256=ident["sha256"])


def _check_same_base(name: str, adapter: PeftAdapter, base: BaseModelInfo) -> None:
    recorded = adapter.base_sha256
    if recorded and recorded != base.sha256:
        raise IncompatibleAdapter(
            f"adapter {name!r} ({adapter.path}) was trained on a base model with weights sha256 {recorded[:12]}…, "
            f"but the package's base ({base.source}) has {base.sha256[:12]}…; retrain the adapter on this base "
            "or export a package from the base it was trained on"
        )


def _check_modules(name: str, adapter: PeftAdapter, inputs: LoraInputs) -> None:
    have = set(inputs.projections)
    missing = sorted({k for m in adapter.target_modules for k in graph_kinds(m)} - have)
    if missing:
        raise IncompatibleAdapter(
            f"adapter {name!r} targets {', '.join(missing)} but the package graph has LoRA inputs only for "
            f"{', '.join(sorted(have))}; re-export the package with this adapter included"
        )


def _entry(name: str, adapter: PeftAdapter, package_dir: Path, file: Path, version: str | None) -> AdapterEntry:
    sha = file_sha256(file)
    training = adapter.training
    return AdapterEntry(
        name=name, version=version or sha[:12], file=file.relative_to(package_dir).as_posix(),
        rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules, template=adapter.template,
        sha256=sha, size_bytes=file.stat().st_size, parity=None, training=training,
    )


def _prepare_out_dir(out_dir: Path) -> None:
    """`out_dir` must be new, empty, a package, or an export that failed; it is then marked incomplete
    (and loses its manifest) until this export succeeds."""
    reusable = (out_dir / MANIFEST_NAME).is_file() or (out_dir / INCOMPLETE_MARKER).is_file()
    if out_dir.exists() and any(out_dir.iterdir()) and not reusable:
        raise FileExistsError(
            f"{out_dir} exists and is not a loraplex package; choose an empty or new directory for --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INCOMPLETE_MARKER).write_text("a `loraplex export` into this directory has not finished\n")
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


def _build_base_graph(base_dir: Path, union: base_graph.LoraUnion, out_dir: Path, *, precision: str, device: str,
                      provider: str | None, timer: StageTimer) -> None:
    """Synthetic adapter -> builder -> ExtractAdapters, in a scratch directory beside `out_dir`;
    then the graph, its weights, tokenizer and genai_config (with the provider) move into `out_dir`."""
    with tempfile.TemporaryDirectory(prefix=".loraplex-export-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        with timer.stage("synthetic adapter"):
            synthetic = base_graph.write_synthetic_adapter(base_dir, union, work / "synthetic_adapter")
        with timer.stage(f"build graph ({precision}, builder)"):
            built = base_graph.build_lora_model(base_dir, synthetic, work / "built", work,
                                                precision=precision, device=device, union=union)
        with timer.stage("extract LoRA inputs (Olive)"):
            extracted = base_graph.extract_adapters(built, work / "extracted", work)
            for stale in [MODEL_FILE, MODEL_FILE + ".data", ADAPTER_DIR]:
                target = out_dir / stale
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            for part in (MODEL_FILE, MODEL_FILE + ".data"):
                if (extracted.parent / part).exists():
                    shutil.move(str(extracted.parent / part), out_dir / part)
                    os.chmod(out_dir / part, convert.readable_mode())
            base_graph.copy_side_files(built.parent, out_dir)
            device_target.write_provider(out_dir / "genai_config.json", provider)


def _check_options(adapters: Mapping[str, str | Path], precision: str, device: str, provider: str | None) -> str | None:
    """Refuse bad export options before any work; returns the provider the package names."""
    if not adapters:
        raise ValueError("export needs at least one adapter (--adapter NAME=DIR)")
    for name in adapters:
        check_adapter_name(name)
    provider = device_target.export_provider(device, provider)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device == "cpu":
        raise ValueError("fp16 needs a GPU target (--device gpu); use fp32 or int4 for CPU")
    return provider


def export_package(
    base_dir: str | Path,
    adapters: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    provider: str | None = None,
    verify: bool = True,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> Manifest:
    """Export `base_dir` and the PEFT adapters `{name: dir}` as one package in `out_dir`.

    The graph gets LoRA inputs for the union of the adapters' modules at their largest rank; each
    adapter file is padded to that rank. With `verify`, every adapter (and the bare base) is
    checked against PyTorch (int4, fp16: against the fp32 export) and the result is in the manifest.
    `timings`, if given, receives the seconds each stage took.
    """
    base_graph.offline_environment()
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    provider = _check_options(adapters, precision, device, provider)
    timer = StageTimer(total=5 + (1 if verify else 0), enabled=progress)
    with timer.stage("read adapters"):
        base = _base_info(base_dir)
        loaded = {name: load_peft_adapter(path) for name, path in adapters.items()}
        for name, adapter in loaded.items():
            _check_same_base(name, adapter, base)
        union = base_graph.LoraUnion.of(list(loaded.values()))

    _prepare_out_dir(out_dir)
    _build_base_graph(base_dir, union, out_dir, precision=precision, device=device, provider=provider, timer=timer)
    with timer.stage("convert adapters"):
        inputs = read_lora_inputs(out_dir / MODEL_FILE)
        entries = {}
        for name, adapter in loaded.items():
            target = out_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}"
            file = convert.convert_adapter(adapter, inputs, union.rank, target)
            entries[name] = _entry(name, adapter, out_dir, file, None)
        manifest = Manifest(
            base=base, precision=precision, device=device, provider=provider, model_file=MODEL_FILE,
            lora_rank=union.rank, lora_modules=inputs.projections, lora_inputs=sorted(inputs.names), adapters=entries,
        )
    if verify:
        with timer.stage("verify parity"):
            _verify_package(out_dir, base_dir, manifest, loaded)
    # The manifest is what makes the directory a package: written last, only once verified.
    manifest.save(out_dir)
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
    timer.close()
    log.info("export of %s done: %s", out_dir, ", ".join(f"{k} {v:.1f}s" for k, v in timer.timings.items()))
    if timings is not None:
        timings.update(timer.timings)
    return manifest


def _verify_package(package_dir: Path, base_dir: Path, manifest: Manifest, adapters: Mapping[str, PeftAdapter],
                    files: Mapping[str, Path] | None = None, check_base: bool = True) -> None:
    """Fill `manifest`'s parity records; raises ParityError naming the adapter that diverges.

    fp32: against PyTorch PEFT, tokens identical. int4 and fp16: against an fp32 export of the same
    adapters, logits within REFERENCE_TOLERANCE (run on CPU whatever the device target, which also
    proves the graph loads and runs in ONNX Runtime).
    """
    files = files or {}
    if manifest.precision != "fp32":
        _verify_against_fp32(package_dir, base_dir, manifest, adapters, files, check_base)
        return
    onnx = parity.OnnxDecoder(package_dir)
    ref = parity.TorchDecoder(base_dir, eos_token_id=None)
    for name, adapter in adapters.items():
        prompts = parity.prompts_for(adapter)
        ids = [onnx.encode(p) for p in prompts]
        onnx.load(name, files.get(name) or package_dir / manifest.adapters[name].file)
        ref.load(name, adapter.path)
        got = [onnx.greedy(i, name) for i in ids]
        want = [ref.greedy(i, name) for i in ids]
        onnx.unload(name)
        manifest.adapters[name].parity = parity.compare(
            name, prompts, ids, got, want, reference="pytorch-peft", tokens_must_match=True,
            tolerance=parity.FP32_LOGIT_TOLERANCE)
    if check_base:
        prompts = list(parity.GENERIC_PROMPTS)
        ids = [onnx.encode(p) for p in prompts]
        manifest.base_parity = parity.compare(
            "(base, no adapter)", prompts, ids, [onnx.greedy(i, None) for i in ids], [ref.greedy(i, None) for i in ids],
            reference="pytorch", tokens_must_match=True, tolerance=parity.FP32_LOGIT_TOLERANCE)


def _verify_against_fp32(package_dir: Path, base_dir: Path, manifest: Manifest, adapters: Mapping[str, PeftAdapter],
                         files: Mapping[str, Path], check_base: bool) -> None:
    factor = REFERENCE_TOLERANCE[manifest.precision]
    with tempfile.TemporaryDirectory(prefix=".loraplex-fp32-ref-", dir=package_dir.parent) as tmp:
        ref_dir = Path(tmp) / "fp32"
        export_package(base_dir, {n: a.path for n, a in adapters.items()}, ref_dir, precision="fp32",
                       verify=False, progress=False)
        q, ref = parity.OnnxDecoder(package_dir), parity.OnnxDecoder(ref_dir)
        for name, adapter in adapters.items():
            prompts = parity.prompts_for(adapter)
            ids = [q.encode(p) for p in prompts]
            q.load(name, files.get(name) or package_dir / manifest.adapters[name].file)
            ref.load(name, ref_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}")
            manifest.adapters[name].parity = _reduced_precision_parity(name, prompts, ids, q, ref, name, factor)
        if check_base:
            prompts = list(parity.GENERIC_PROMPTS)
            ids = [q.encode(p) for p in prompts]
            manifest.base_parity = _reduced_precision_parity("(base, no adapter)", prompts, ids, q, ref, None,
                                                             factor)
        del q, ref


def _reduced_precision_parity(name: str, prompts: list[str], ids: list[list[int]], q: parity.OnnxDecoder,
                              ref: parity.OnnxDecoder, adapter: str | None, factor: float) -> Parity:
    """Logits compared along the reduced-precision model's own tokens (teacher-forced fp32), within
    `factor` standard deviations of the fp32 logits; tokens compared free-running and recorded, not
    required to match."""
    import numpy as np

    got = [q.greedy(i, adapter) for i in ids]
    forced = [_teacher_forced(ref, i, g.tokens, adapter) for i, g in zip(ids, got, strict=True)]
    tolerance = factor * float(np.std(np.concatenate([f.logits.reshape(-1) for f in forced])))
    result = parity.compare(name, prompts, ids, got, forced, reference="onnx-fp32", tokens_must_match=False,
                            tolerance=tolerance)
    result.tokens_equal = all(g.tokens == ref.greedy(i, adapter).tokens for i, g in zip(ids, got, strict=True))
    return result


def _teacher_forced(decoder: parity.OnnxDecoder, ids: list[int], tokens: list[int],
                    adapter: str | None) -> parity.Decoded:
    """The fp32 model's logits along another model's tokens (so the two compare position by position)."""
    import numpy as np

    logits = []
    for step in range(len(tokens)):
        d = decoder.greedy(list(ids) + tokens[:step], adapter, max_new_tokens=1)
        logits.append(d.logits[0])
    return parity.Decoded(list(tokens), np.stack(logits) if logits else np.zeros((0, 0), np.float32))


def add_adapter(package_dir: str | Path, name: str, adapter_dir: str | Path, *, version: str | None = None,
                verify: bool = True) -> AdapterEntry:
    """Add or replace adapter `name` in an existing package, without rebuilding the base graph.

    The new file is written beside the old one and renamed over it only after it fits the graph
    (and passes parity with `verify`), so a running server never sees a half-written or bad file.
    """
    base_graph.offline_environment()
    package_dir = Path(package_dir).resolve()
    check_adapter_name(name)
    manifest = Manifest.load(package_dir)
    adapter = load_peft_adapter(adapter_dir)
    _check_same_base(name, adapter, manifest.base)
    inputs = read_lora_inputs(package_dir / manifest.model_file)
    _check_modules(name, adapter, inputs)
    final = package_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}"
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=ADAPTER_SUFFIX, dir=final.parent)
    os.close(fd)
    candidate = Path(tmp_name)
    try:
        convert.convert_adapter(adapter, inputs, manifest.lora_rank, candidate)
        entry = _entry(name, adapter, package_dir, candidate, version)
        entry.file = final.relative_to(package_dir).as_posix()
        if verify:
            base_dir = Path(manifest.base.source)
            if not base_dir.is_dir():
                raise ManifestError(
                    f"cannot verify adapter {name!r}: the package's base model {base_dir} is gone; pass "
                    "verify=False (--no-verify) or restore the base directory"
                )
            trial = Manifest.from_dict(_as_dict(manifest))
            trial.adapters[name] = entry
            _verify_package(package_dir, base_dir, trial, {name: adapter}, files={name: candidate}, check_base=False)
        os.replace(candidate, final)
    except BaseException:
        candidate.unlink(missing_ok=True)
        raise
    # Re-read: another `adapters add` may have landed meanwhile; only this entry changes.
    manifest = Manifest.load(package_dir)
    manifest.adapters[name] = entry
    manifest.save(package_dir)
    return entry


def _as_dict(manifest: Manifest) -> dict:
    import json

    return json.loads(manifest.to_json())


__all__ = ["AdapterError", "IncompatibleAdapter", "Parity", "add_adapter", "export_package"]
