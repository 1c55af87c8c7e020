"""`accelerate`: one clear fallback on CPU; on a GPU the 2:4 kernels give the dense-with-zeros logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_model

from semisparse.acceleration import accelerate, gpu_fallback_reason
from semisparse.errors import SemisparseError
from semisparse.pruning import MagnitudeConfig, prune

needs_gpu = pytest.mark.skipif(gpu_fallback_reason() is not None, reason="needs an Ampere+ CUDA GPU")


def sparse_llama() -> torch.nn.Module:
    model = make_tiny_model("llama")
    prune(model, MagnitudeConfig())
    return model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_falls_back_to_dense_with_one_message() -> None:
    model = sparse_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = accelerate(model)
    assert len(caught) == 1
    assert str(caught[0].message) == report.fallback
    assert report.fallback.startswith("2:4 acceleration off, running dense with zeros: no CUDA GPU")
    assert report.summary() == report.fallback
    assert report.swapped == [] and report.to_dict()["fallback"] == report.fallback
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(ids).logits, before)


def test_bad_arguments_are_user_errors() -> None:
    model = sparse_llama()
    with pytest.raises(SemisparseError, match="unknown 2:4 backend"):
        accelerate(model, backend="magic")
    with pytest.raises(SemisparseError, match="float16 or bfloat16"):
        accelerate(model, dtype=torch.float32)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [None, "cutlass"])
def test_gpu_logits_match_dense_with_zeros(dtype: torch.dtype, backend: str | None) -> None:
    model = sparse_llama().to("cuda", dtype)
    dense = sparse_llama().to("cuda", dtype)
    model.model.layers[0].mlp.down_proj.weight.data[0, :4] = 1.0  # one layer no longer 2:4
    dense.model.layers[0].mlp.down_proj.weight.data[0, :4] = 1.0
    ids = torch.randint(0, 256, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    report = accelerate(model, backend=backend)
    assert report.fallback is None
    assert "model.layers.0.mlp.down_proj" in report.skipped
    assert len(report.swapped) == 13
    assert isinstance(model.model.layers[1].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        got, want = model(ids).logits.float(), dense(ids).logits.float()
    tolerance = 2e-2 if dtype == torch.float16 else 1e-1
    assert torch.allclose(got, want, atol=tolerance, rtol=tolerance)
