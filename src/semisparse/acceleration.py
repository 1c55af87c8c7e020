"""Run 2:4 layers on the GPU's sparse tensor cores through PyTorch's semi-structured sparse tensors.

`accelerate` swaps the weight of every 2:4 `nn.Linear` target for `torch.sparse.to_sparse_semi_structured`
(cuSPARSELt, or CUTLASS), which halves the multiply work of `F.linear`. That needs an NVIDIA GPU from
Ampere on, fp16/bf16 weights and shapes that are multiples of the backend's tile; everything else stays
dense with its zeros, which computes the same function. Each skipped layer gets a reason, and when no layer
can be swapped (always on CPU) one warning says why, once.

int8 / fp8 weights need quantized activations as well (a different model, not a drop-in swap), so
`accelerate` handles fp16/bf16; `semisparse bench` reports what the kernels can do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, layer_filter

BACKENDS: tuple[str, ...] = ("cusparselt", "cutlass")
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED = "float16 or bfloat16"


@dataclass
class AccelerationReport:
    """Which layers now run 2:4 kernels, which stayed dense and why, and the fallback message if any."""

    dtype: str
    backend: str | None
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "backend": self.backend,
            "swapped": self.swapped,
            "skipped": self.skipped,
            "fallback": self.fallback,
        }

    def summary(self) -> str:
        if self.fallback:
            return self.fallback
        text = f"2:4 kernels ({self.backend}, {self.dtype}) on {len(self.swapped)} layers"
        if self.skipped:
            name, reason = next(iter(self.skipped.items()))
            text += f"; {len(self.skipped)} stayed dense (e.g. {name}: {reason})"
        return text


def gpu_fallback_reason(device: torch.device | None = None) -> str | None:
    """Why 2:4 kernels cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: 2:4 kernels need an NVIDIA GPU (Ampere or newer)"
    if device is not None and device.type != "cuda":
        return f"the model is on {device}, not a CUDA GPU: move it with model.to('cuda') first"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (
            f"GPU compute capability {major}.{minor} has no sparse tensor cores (needs 8.0, Ampere, or newer)"
        )
    return None


def _sparse_class(backend: str | None) -> type:
    """The semi-structured tensor class `to_sparse_semi_structured` will produce for `backend`."""
    cusparselt = torch.backends.cusparselt.is_available()
    if backend == "cutlass" or (backend is None and not cusparselt):
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    if not cusparselt:
        raise SemisparseError("this PyTorch build has no cuSPARSELt: use `backend`=cutlass")
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


@contextmanager
def _backend(cls: type) -> Iterator[None]:
    """Make `to_sparse_semi_structured` build `cls` (PyTorch picks the class from a global flag)."""
    base = torch.sparse.SparseSemiStructuredTensor
    previous = base._FORCE_CUTLASS
    base._FORCE_CUTLASS = cls is torch.sparse.SparseSemiStructuredTensorCUTLASS
    try:
        yield
    finally:
        base._FORCE_CUTLASS = previous


def shape_reason(cls: type, weight: torch.Tensor) -> str | None:
    """Why a 2-D weight cannot become `cls` (dtype or tile multiple), None if it can."""
    constraints = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if constraints is None or weight.dtype not in SPARSE_DTYPES:
        return (
            f"dtype {str(weight.dtype).removeprefix('torch.')} has no drop-in 2:4 kernel (use {_SUPPORTED})"
        )
    rows, cols = weight.shape
    min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if rows % min_rows or cols % min_cols or rows < min_rows or cols < min_cols:
        return f"shape {rows}x{cols} is not a multiple of the {cls.BACKEND} tile {min_rows}x{min_cols}"
    return None


def to_semi_structured(weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """A 2:4 CUDA weight as a semi-structured sparse tensor of the chosen backend (raises on misfit)."""
    cls = _sparse_class(backend)
    reason = shape_reason(cls, weight)
    if reason:
        raise SemisparseError(f"cannot make a 2:4 kernel weight: {reason}")
    with _backend(cls):
        return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())


def _skip_reason(module: nn.Module, cls: type) -> str | None:
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is not an nn.Linear (only plain Linear weights are swapped)"
    weight = module.weight
    if weight.device.type != "cuda":
        return f"weight is on {weight.device}"
    if not nm.is_nm(weight, 2, 4):
        return f"not 2:4 ({nm.sparsity(weight):.0%} zeros)"
    return shape_reason(cls, weight)


def accelerate(
    model: nn.Module,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> AccelerationReport:
    """Swap the 2:4 linears of `model` (in place) to semi-structured sparse weights; returns the report.

    `dtype` casts the model first (fp16/bf16; None keeps its dtype). `backend` None lets PyTorch choose
    (cuSPARSELt when built in). Call it last: moving or casting the model afterwards is not supported.
    Without a usable GPU nothing changes and one warning (also in `report.fallback`) says why.
    """
    if backend is not None and backend not in BACKENDS:
        raise SemisparseError(f"unknown 2:4 backend '{backend}': use one of {', '.join(BACKENDS)}")
    if dtype is not None and dtype not in SPARSE_DTYPES:
        raise SemisparseError(
            f"accelerate runs {_SUPPORTED} 2:4 kernels, not {dtype}: pass dtype=torch.bfloat16"
        )
    first = next(model.parameters(), None)
    report_dtype = dtype or (first.dtype if first is not None else torch.float32)
    report = AccelerationReport(dtype=str(report_dtype).removeprefix("torch."), backend=backend)
    reason = gpu_fallback_reason(first.device if first is not None else None)
    if reason is None and report_dtype not in SPARSE_DTYPES:
        reason = f"the model is {report.dtype}: 2:4 kernels need {_SUPPORTED} (pass dtype=torch.bfloat16)"
    if reason is not None:
        report.fallback = f"2:4 acceleration off, running dense with zeros: {reason}"
        warnings.warn(report.fallback, stacklevel=2)
        return report
    cls = _sparse_class(backend)
    report.backend = cls.BACKEND
    if dtype is not None:
        model.to(dtype)
    with _backend(cls):
        for name, module in find_targets(model, layer_filter(include, exclude)).items():
            why = _skip_reason(module, cls)
            if why is None:
                try:
                    sparse = torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous())
                except (RuntimeError, NotImplementedError) as err:
                    why = f"conversion failed ({str(err).strip().splitlines()[0]})"
                else:
                    module.weight = nn.Parameter(sparse, requires_grad=False)
                    report.swapped.append(name)
            if why is not None:
                report.skipped[name] = why
    if not report.swapped:
        first_reason = next(iter(report.skipped.values()), "no target layers")
        report.fallback = (
            f"2:4 acceleration off, running dense with zeros: no layer qualifies ({first_reason})"
        )
        warnings.warn(report.fallback, stacklevel=2)
    return report
