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

from loraplex.adapters.export import base_graph, convert, device_target, tokenizer_check
from loraplex.adapters.export.convert import IncompatibleAdapter
from loraplex.adapters.export.module_map import graph_kinds
from loraplex.adapters.export.peft_adapter import AdapterError, PeftAdapter, load_peft_adapter
from loraplex.adapters.export.stages import StageTimer
from loraplex.adapters.export.verify import Verification, verify_package
from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX, readable_mode
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


def _base_info(base_dir: Path) -> BaseModelInfo:
    from loraplex.trainer.base_model import base_identity

    ident = base_identity(base_dir)
    return BaseModelInfo(architecture=ident["architecture"], model_type=ident["model_type"],
                         source=ident["path"], sha256=ident["sha256"], imported_from=ident.get("source"))


def _check_same_base(name: str, adapter: PeftAdapter, base: BaseModelInfo) -> None:
    recorded = adapter.base_sha256
    if recorded and recorded != base.sha256:
        raise IncompatibleAdapter(
            f"adapter {name!r} ({adapter.path}) was trained on a base model with weights sha256 {recorded[:12]}…, "
            f"but the package's base ({base.source}) has {base.sha256[:12]}…; retrain the adapter on this base "
            "or export a package from the base it was trained on"
        )


def _check_output(name: str, adapter: PeftAdapter) -> dict | None:
    """The adapter's recorded output contract, checked to compile as the server will (None: free text)."""
    if adapter.output is None:
        return None
    from loraplex.adapters.package.output import OutputConstraint, OutputSpecError
    from loraplex.runtime.api import check_output_contract
    from loraplex.runtime.errors import InvalidRequest

    try:
        constraint = check_output_contract(OutputConstraint.from_dict(adapter.output))
    except (OutputSpecError, InvalidRequest) as exc:
        raise AdapterError(
            f"adapter {name!r}: the output contract in its training.json is invalid: {exc}; fix `output:` in the "
            "task file and retrain, or edit training.json"
        ) from None
    return constraint.to_dict()


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
    return AdapterEntry(
        name=name, version=version or sha[:12], file=file.relative_to(package_dir).as_posix(),
        rank=adapter.rank, alpha=adapter.alpha, target_modules=adapter.target_modules, template=adapter.template,
        sha256=sha, size_bytes=file.stat().st_size, parity=None, training=adapter.training,
        peft_size_bytes=adapter.weights_size, output=_check_output(name, adapter),
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
                      provider: str | None, int4: base_graph.Int4Options, timer: StageTimer) -> None:
    """Synthetic adapter -> builder -> ExtractAdapters, in a scratch directory beside `out_dir`;
    then the graph, its weights, tokenizer and genai_config (with the provider) move into `out_dir`."""
    with tempfile.TemporaryDirectory(prefix=".loraplex-export-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        with timer.stage("synthetic adapter"):
            synthetic = base_graph.write_synthetic_adapter(base_dir, union, work / "synthetic_adapter")
        with timer.stage(f"build graph ({precision}, builder)"):
            built = base_graph.build_lora_model(base_dir, synthetic, work / "built", work,
                                                precision=precision, device=device, union=union, int4=int4)
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
                    os.chmod(out_dir / part, readable_mode())
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
    int4: base_graph.Int4Options | None = None,
    verify: bool = True,
    verification: Verification | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
    outputs: Mapping[str, dict | None] | None = None,
) -> Manifest:
    """Export `base_dir` and the PEFT adapters `{name: dir}` as one package in `out_dir`.

    The graph gets LoRA inputs for the union of the adapters' modules (any rank loads); each adapter
    file holds its own modules at its own rank. With `verify`, every adapter (and the bare base) is
    checked against PyTorch (`verify.py`: exact tokens in fp32, task accuracy within the allowed drop
    at every precision) and the results are in the manifest. `timings`, if given, receives the
    seconds each stage took. `outputs` overrides the output contract training recorded for the
    adapters it names ({kind, spec}, or None for free text): a task file's `output:` at export.
    """
    base_graph.offline_environment()
    base_dir, out_dir = Path(base_dir).resolve(), Path(out_dir).resolve()
    provider = _check_options(adapters, precision, device, provider)
    timer = StageTimer(total=5 + (1 if verify else 0) + (1 if device == "cpu" else 0), enabled=progress)
    with timer.stage("read adapters"):
        base = _base_info(base_dir)
        loaded = {name: load_peft_adapter(path) for name, path in adapters.items()}
        for name, contract in (outputs or {}).items():
            loaded[name].training = {**(loaded[name].training or {}), "output": contract}
        for name, adapter in loaded.items():
            _check_same_base(name, adapter, base)
            _check_output(name, adapter)  # before the long build
        union = base_graph.LoraUnion.of(list(loaded.values()))

    _prepare_out_dir(out_dir)
    _build_base_graph(base_dir, union, out_dir, precision=precision, device=device, provider=provider,
                      int4=int4 or base_graph.Int4Options(), timer=timer)
    with timer.stage("convert adapters"):
        inputs = read_lora_inputs(out_dir / MODEL_FILE)
        entries = {}
        for name, adapter in loaded.items():
            target = out_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}"
            file = convert.convert_adapter(adapter, inputs, target)
            entries[name] = _entry(name, adapter, out_dir, file, None)
        manifest = Manifest(
            base=base, precision=precision, device=device, provider=provider, model_file=MODEL_FILE,
            lora_rank=union.rank, lora_modules=inputs.projections, lora_inputs=sorted(inputs.names), adapters=entries,
            lora_graph_inputs=inputs.to_records(), tokenizer=tokenizer_check.choose_library(out_dir),
        )
    if device == "cpu":
        with timer.stage("banked graph (batched engine)"):
            _write_banked_graph(out_dir)
    if verify:
        with timer.stage("verify parity and accuracy"):
            verify_package(out_dir, base_dir, manifest, loaded, verification or Verification())
    # The manifest is what makes the directory a package: written last, only once verified.
    manifest.save(out_dir)
    (out_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
    timer.close()
    log.info("export of %s done: %s", out_dir, ", ".join(f"{k} {v:.1f}s" for k, v in timer.timings.items()))
    if timings is not None:
        timings.update(timer.timings)
    return manifest


def _write_banked_graph(out_dir: Path) -> None:
    """The batched engine's rewrite of the graph, cached beside it now rather than at the server's first
    start: a server then opens the package without importing `onnx` or rewriting anything."""
    from loraplex.runtime.api import write_batched_graph

    try:
        write_batched_graph(out_dir / MODEL_FILE)
    except ValueError as exc:  # the package still serves with the genai engine
        log.warning("no banked graph for the batched engine (%s): serve this package with --engine genai", exc)


def add_adapter(package_dir: str | Path, name: str, adapter_dir: str | Path, *, version: str | None = None,
                verify: bool = True, verification: Verification | None = None) -> AdapterEntry:
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
    _check_output(name, adapter)
    inputs = read_lora_inputs(package_dir / manifest.model_file)
    _check_modules(name, adapter, inputs)
    final = package_dir / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}"
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=ADAPTER_SUFFIX, dir=final.parent)
    os.close(fd)
    candidate = Path(tmp_name)
    try:
        convert.convert_adapter(adapter, inputs, candidate)
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
            verify_package(package_dir, base_dir, trial, {name: adapter}, verification or Verification(),
                           files={name: candidate}, check_base=False)
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
