"""`.onnx_adapter` files: read, check against a graph's LoRA inputs, pad, write, in one place.

An adapter file holds, for each module it adapts, the A ([in, r]) and B ([r, out], pre-scaled)
tensors named like the graph's LoRA inputs (see `lora_inputs`), each module at its own rank: a
package ships no padding. The server's registry calls `read_adapter_file` at Load, for every
engine, so a file that would only fail at the first generation (an unknown name, a wrong dim,
another dtype, NaN) is refused before any request can use it.

Running a graph needs more than that: ONNX Runtime's memory planner reuses buffers across the
LoRA MatMuls of one run as if they all had one rank, so binding some LoRA inputs at rank r and
leaving others at their zero-rank default (or binding two ranks) fails with "Shape mismatch
attempting to re-use buffer" (onnxruntime 1.32). Whatever binds a file to the plain graph binds
`AdapterWeights.padded()`: every graph input, all at the file's largest rank, zeros where the file
has nothing (exact: zero columns of A meet zero rows of B). The batched engine pads in its banks.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loraplex.adapters.package.lora_inputs import LoraInputs, lora_input_name

ADAPTER_SUFFIX = ".onnx_adapter"
# No trained LoRA weight comes near this (float16's largest value); such weights overflow activations.
MAX_ABS_WEIGHT = 65504.0


class AdapterFileError(ValueError):
    """The file cannot serve with this graph; the message names the file, the tensor and the fault."""


@dataclass(frozen=True)
class AdapterWeights:
    """A checked adapter file: graph input name -> tensor, each module's rank."""

    path: Path
    tensors: dict[str, np.ndarray]
    ranks: dict[str, int]  # module -> rank
    sha256: str = ""  # the file's, once a server has verified it ("": not known)

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def covers(self, inputs: LoraInputs) -> bool:
        """True when the file binds every graph input at one rank (no padding needed to run it)."""
        return len(self.tensors) == len(inputs) and len(set(self.ranks.values())) == 1

    def padded(self, inputs: LoraInputs) -> dict[str, np.ndarray]:
        """Every graph input at this file's largest rank, in graph order; zeros where it has nothing."""
        rank, out = self.rank, {}
        for spec in inputs.inputs:
            tensor = self.tensors.get(spec.name)
            if tensor is not None and tensor.shape == spec.shape(rank):
                out[spec.name] = tensor
                continue
            full = np.zeros(spec.shape(rank), dtype=spec.dtype)
            if tensor is not None:
                full[: tensor.shape[0], : tensor.shape[1]] = tensor
            out[spec.name] = full
        return out


def read_adapter_file(path: str | Path, inputs: LoraInputs) -> AdapterWeights:
    """Read `path` and check it fits `inputs`; raises AdapterFileError naming the first fault."""
    import onnxruntime as ort

    path = Path(path)
    if not inputs:
        raise AdapterFileError("the package graph has no LoRA inputs: re-export it with `loraplex export`")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        # Copy: the arrays view memory owned by the AdapterFormat object.
        tensors = {name: np.array(value.numpy(), copy=True) for name, value in params.items()}
    except Exception as exc:  # onnxruntime raises a bare RuntimeError for a malformed file
        raise AdapterFileError(f"{path.name} is not an {ADAPTER_SUFFIX} file ({exc})") from exc
    if not tensors:
        raise AdapterFileError(f"{path.name} holds no weights")
    ranks: dict[str, int] = {}
    for name, tensor in tensors.items():
        module, rank = _check_tensor(path, name, tensor, inputs)
        partner = lora_input_name(module, "B" if inputs[name].kind == "A" else "A")
        if partner not in tensors:
            raise AdapterFileError(f"{path.name} has {name} but lacks its partner {partner}")
        if ranks.setdefault(module, rank) != rank:
            raise AdapterFileError(
                f"{path.name}: the A and B tensors of {module} have ranks {ranks[module]} and {rank}; they must agree"
            )
    return AdapterWeights(path, tensors, ranks)


def _check_tensor(path: Path, name: str, tensor: np.ndarray, inputs: LoraInputs) -> tuple[str, int]:
    """(module, rank) of one tensor after checking its name, shape, dtype and values."""
    spec = inputs.get(name)
    if spec is None:
        raise AdapterFileError(
            f"{path.name} has weight {name!r} but the package graph has no such LoRA input; re-export the "
            "package with this adapter's target modules included"
        )
    if tensor.ndim != 2:
        raise AdapterFileError(f"{path.name}: {name} has shape {list(tensor.shape)}; LoRA weights are 2-D")
    fixed, rank = spec.split(tensor.shape)
    if fixed != spec.fixed:
        want = f"[{spec.fixed}, r]" if spec.kind == "A" else f"[r, {spec.fixed}]"
        raise AdapterFileError(
            f"{path.name}: {name} has shape {list(tensor.shape)} but the graph expects {want}; "
            "was it exported for another base model?"
        )
    if rank < 1:
        raise AdapterFileError(f"{path.name}: {name} has rank 0")
    if tensor.dtype != spec.dtype:
        raise AdapterFileError(
            f"{path.name}: {name} is {tensor.dtype} but the graph's LoRA inputs are {spec.dtype}; "
            "convert the adapter for this package with `loraplex adapters add`"
        )
    if not np.isfinite(tensor).all():
        raise AdapterFileError(f"{path.name}: {name} holds NaN or infinite values")
    largest = float(np.abs(tensor).max())
    if largest > MAX_ABS_WEIGHT:
        raise AdapterFileError(
            f"{path.name}: {name} holds a weight of magnitude {largest:.3g}, beyond {MAX_ABS_WEIGHT:g}; "
            "no trained LoRA has such weights: the file is corrupt"
        )
    return spec.module, rank


def loadable_file(weights: AdapterWeights, inputs: LoraInputs, scratch: Path) -> Path:
    """A file onnxruntime(-genai) can bind to the plain graph: the file itself when it covers every
    input at one rank, else a padded copy written into `scratch` (the caller removes it)."""
    if weights.covers(inputs):
        return weights.path
    fd, name = tempfile.mkstemp(prefix=f"{weights.path.stem}.", suffix=ADAPTER_SUFFIX, dir=scratch)
    os.close(fd)
    return write_adapter_file(weights.padded(inputs), name)


def write_adapter_file(tensors: dict[str, np.ndarray], out_path: str | Path) -> Path:
    """Write tensors as an ONNX Runtime adapter file, atomically, readable like any new file.

    A running server may have the old file memory-mapped: never truncate it in place; write a
    temporary file beside it and rename over it.
    """
    import onnxruntime as ort

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        fmt = ort.AdapterFormat()
        fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()})
        fmt.export_adapter(tmp)
        os.chmod(tmp, readable_mode())  # mkstemp makes 0600; a server under another user must read it
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def readable_mode() -> int:
    """0666 minus the process umask: what a plain `open(..., "w")` would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
