"""One-shot pruning end to end: exact patterns on every family, the score formulas, and the sequential
calibration engine (inputs of block b come from the pruned blocks before it)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB_SIZE, make_tiny_model
from torch import nn

from semisparse import nm, registry
from semisparse.errors import SemisparseError
from semisparse.modules import decoder_blocks, find_targets, layer_filter, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import MagnitudeConfig, prune, pruner_config
from semisparse.pruning.engine import run_sequential
from semisparse.pruning.magnitude import magnitude_mask, prune_magnitude
from semisparse.pruning.wanda import WandaPruner, wanda_mask

# Inputs of block 1's first projections are a function of the block input only (after its layer norm).
BLOCK1_INPUT_LAYERS = {
    "llama": ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
    "opt": ("model.decoder.layers.1.self_attn.q_proj", "model.decoder.layers.1.self_attn.k_proj"),
    "gpt2": ("transformer.h.1.attn.c_attn",),
}


def calibration(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def state_outside_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter but the targets' weights (biases, norms, embeddings, LM head): must not change."""
    target_weights = {id(m.weight) for m in find_targets(model).values()}
    return {k: v.detach().clone() for k, v in model.named_parameters() if id(v) not in target_weights}


def explicit_keep_mask(
    scores: torch.Tensor, pattern: NMPattern | None, sparsity: float | None
) -> torch.Tensor:
    """The N:M / per-row rule written out with Python loops, as an independent oracle."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    rows, cols = scores.shape
    for r in range(rows):
        if pattern is None:
            order = sorted(range(cols), key=lambda c: scores[r, c].item())
            for c in order[int(sparsity * cols) :]:
                keep[r, c] = True
            continue
        for g in range(0, cols, pattern.m):
            order = sorted(range(g, g + pattern.m), key=lambda c: -scores[r, c].item())
            for c in order[: pattern.n]:
                keep[r, c] = True
    return keep


# 2:4 on every family; the other patterns on one rotary (Llama) and one Conv1D (GPT-2) family.
PATTERN_CASES = [(arch, "2:4") for arch in ARCHS] + [
    (arch, pattern) for arch in ("llama", "gpt2") for pattern in ("4:8", "1:4")
]


@pytest.mark.parametrize("arch, pattern", PATTERN_CASES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_target_follows_the_pattern(arch: str, method: str, pattern: str) -> None:
    model = make_tiny_model(arch)
    untouched = state_outside_targets(model)
    parsed = nm.parse_pattern(pattern)
    ids = calibration(4, 16) if method != "magnitude" else None
    per_layer = prune(model, pruner_config(method, pattern=pattern), calibration_ids=ids, progress=False)

    targets = find_targets(model)
    assert list(per_layer) == list(targets)
    for name, module in targets.items():
        weight = weight_matrix(module)
        assert nm.is_nm(weight, parsed.n, parsed.m), name
        assert per_layer[name] == pytest.approx(parsed.sparsity, abs=1e-6), name
    for name, tensor in state_outside_targets(model).items():
        assert torch.equal(tensor, untouched[name]), f"{name} is not a target but changed"
    logits = model(input_ids=calibration(2, 16, seed=1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_prunes_the_exact_fraction_of_every_row(method: str) -> None:
    model = make_tiny_model("llama")
    ids = calibration(4, 16) if method == "wanda" else None
    per_layer = prune(model, pruner_config(method, sparsity=0.5), calibration_ids=ids, progress=False)
    for name, module in find_targets(model).items():
        weight = weight_matrix(module)
        zeros_per_row = (weight == 0).sum(dim=1)
        assert (zeros_per_row == weight.shape[1] // 2).all(), name
        assert per_layer[name] == pytest.approx(0.5)


def test_sparsegpt_unstructured_reaches_the_requested_sparsity() -> None:
    model = make_tiny_model("qwen2")
    per_layer = prune(
        model, pruner_config("sparsegpt", sparsity=0.6), calibration_ids=calibration(4, 16), progress=False
    )
    for name, module in find_targets(model).items():
        weight = weight_matrix(module)
        blocks = range(0, weight.shape[1], 128)
        expected = sum(int(weight[:, b : b + 128].numel() * 0.6) for b in blocks) / weight.numel()
        assert per_layer[name] == pytest.approx(expected), name


@pytest.mark.parametrize("pattern, sparsity", [(NMPattern(2, 4), None), (NMPattern(1, 4), None), (None, 0.5)])
def test_magnitude_mask_is_the_largest_weights(pattern: NMPattern | None, sparsity: float | None) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    weight = layer.weight.detach().clone()
    expected = explicit_keep_mask(weight.abs(), pattern, sparsity)
    assert torch.equal(magnitude_mask(weight, pattern, sparsity), expected)
    prune_magnitude(layer, pattern, sparsity)
    assert torch.equal(layer.weight, torch.where(expected, weight, torch.zeros_like(weight)))


@pytest.mark.parametrize("pattern, sparsity", [(NMPattern(2, 4), None), (NMPattern(4, 8), None), (None, 0.5)])
def test_wanda_mask_weighs_magnitude_by_input_norm(pattern: NMPattern | None, sparsity: float | None) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    weight = layer.weight.detach().clone()
    feature_scale = torch.logspace(-1, 1, 16)[torch.randperm(16)]
    batches = [torch.randn(2, 5, 16) * feature_scale, torch.randn(1, 7, 16) * feature_scale]
    norms = torch.cat([b.reshape(-1, 16) for b in batches]).norm(dim=0)
    expected = explicit_keep_mask(weight.abs() * norms, pattern, sparsity)
    assert not torch.equal(expected, explicit_keep_mask(weight.abs(), pattern, sparsity))

    pruner = WandaPruner(layer, pattern, sparsity)
    for batch in batches:
        pruner.add_batch(batch)
    assert torch.allclose(pruner.input_sq_norms, norms.square(), rtol=1e-5)
    assert torch.equal(wanda_mask(weight, norms.square(), pattern, sparsity), expected)
    pruner.prune()
    assert torch.equal(layer.weight, torch.where(expected, weight, torch.zeros_like(weight)))


def test_model_level_magnitude_uses_each_layers_own_weights() -> None:
    model = make_tiny_model("gpt2")
    before = {name: weight_matrix(m).detach().clone() for name, m in find_targets(model).items()}
    prune(model, MagnitudeConfig(pattern="2:4"), progress=False)
    for name, module in find_targets(model).items():
        keep = magnitude_mask(before[name], NMPattern(2, 4), None)
        assert torch.equal(
            weight_matrix(module),
            torch.where(keep, before[name], torch.zeros_like(keep, dtype=torch.float32)),
        )


def input_sq_norms(model: nn.Module, names: tuple[str, ...], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Squared input norms of some layers over a plain forward of the whole model."""
    modules = dict(model.named_modules())
    norms = {name: torch.zeros(weight_matrix(modules[name]).shape[1]) for name in names}

    def record(name: str, inp: torch.Tensor) -> None:
        norms[name] += inp.reshape(-1, inp.shape[-1]).square().sum(0)

    handles = [
        modules[name].register_forward_hook(lambda _m, inputs, _o, n=name: record(n, inputs[0]))
        for name in names
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return norms


@pytest.mark.parametrize("arch", sorted(BLOCK1_INPUT_LAYERS))
def test_engine_calibrates_each_block_on_the_pruned_blocks_before_it(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: dict[str, WandaPruner] = {}

    class RecordingWanda(WandaPruner):
        def prune(self) -> None:
            used[next(n for n, m in find_targets(model).items() if m is self.module)] = self
            super().prune()

    monkeypatch.setattr("semisparse.pruning.wanda.WandaPruner", RecordingWanda)
    model = make_tiny_model(arch)
    ids = calibration(6, 24)
    names = BLOCK1_INPUT_LAYERS[arch]
    dense_norms = input_sq_norms(model, names, ids)

    prune(model, pruner_config("wanda", pattern="2:4"), calibration_ids=ids, progress=False)
    assert set(used) == set(find_targets(model))
    pruned_norms = input_sq_norms(model, names, ids)
    for name in names:
        engine_norms = used[name].input_sq_norms
        assert torch.allclose(engine_norms, pruned_norms[name], rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(engine_norms, dense_norms[name], rtol=1e-3), f"{name} saw dense inputs"


def test_engine_restores_the_model_even_when_calibration_fails() -> None:
    model = make_tiny_model("llama")
    model.train()
    model.config.use_cache = True
    blocks_before = list(decoder_blocks(model))
    hooks_before = [len(m._forward_hooks) for m in model.modules()]

    class Failing:
        def add_batch(self, inp: torch.Tensor) -> None:
            raise RuntimeError("boom")

        def prune(self) -> None:
            pass

    with pytest.raises(RuntimeError, match="boom"):
        run_sequential(
            model, find_targets(model), lambda name, m: Failing(), calibration(2, 8), progress=False
        )
    assert list(decoder_blocks(model)) == blocks_before
    assert model.config.use_cache is True
    assert all(m.training for m in model.modules())
    assert [len(m._forward_hooks) for m in model.modules()] == hooks_before


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
        ),
    ],
)
def test_explicit_device_prunes_like_the_models_own_and_leaves_the_model_in_place(device: str) -> None:
    ids = calibration(4, 16)
    reference = make_tiny_model("gpt2")
    prune(reference, pruner_config("sparsegpt"), calibration_ids=ids, progress=False)
    model = make_tiny_model("gpt2")
    prune(model, pruner_config("sparsegpt"), calibration_ids=ids, device=device, progress=False)

    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.transformer.wte.weight, "tied embeddings were untied"
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        if device == "cpu":
            assert torch.equal(value, expected[key]), key
        else:
            assert ((value == 0) == (expected[key] == 0)).float().mean() > 0.995, key
            assert torch.allclose(value, expected[key], atol=1e-2), key


def test_only_selected_layers_are_pruned() -> None:
    model = make_tiny_model("mistral")
    per_layer = prune(
        model,
        pruner_config("wanda", pattern="2:4"),
        layer_filter(include=["*.mlp.*"], exclude=["*.0.mlp.down_proj"]),
        calibration_ids=calibration(2, 8),
        progress=False,
    )
    assert set(per_layer) == {
        n for n in find_targets(model) if ".mlp." in n and n != "model.layers.0.mlp.down_proj"
    }
    for name, module in find_targets(model).items():
        assert (nm.sparsity(weight_matrix(module)) > 0.4) == (name in per_layer), name


@pytest.mark.parametrize(
    "settings, calibration_ids, message",
    [
        ({"method": "obs", "pattern": "2:4"}, None, "unknown pruner 'obs'"),
        ({"method": "wanda", "pattern": "2:4"}, None, "calibration"),
        ({"method": "sparsegpt", "pattern": "2:4"}, None, "calibration"),
        ({"method": "magnitude", "pattern": "2:4", "sparsity": 0.5}, None, "exactly one"),
        ({"method": "magnitude", "sparsity": 1.0}, None, "outside"),
        ({"method": "wanda", "sparsity": 0.5}, torch.zeros(0, 16, dtype=torch.long), "sample"),
        ({"method": "sparsegpt", "pattern": "2:4", "blocksize": 6}, calibration(), "blocksize"),
        ({"method": "magnitude", "blocksize": 128}, None, "unknown magnitude setting.*valid: pattern"),
        ({"method": "sparsegpt", "percdamp": "lots"}, calibration(), "percdamp.*must be a number"),
    ],
)
def test_bad_requests_raise_a_user_error(
    settings: dict, calibration_ids: torch.Tensor | None, message: str
) -> None:
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SemisparseError, match=message):
        prune(model, pruner_config(**settings), calibration_ids=calibration_ids, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_pruner_config_without_pattern_or_sparsity_means_two_of_four() -> None:
    assert MagnitudeConfig().pattern == "2:4"
    assert MagnitudeConfig(sparsity=0.5).pattern is None


def test_pruner_facts_come_from_the_registry() -> None:
    facts = {name: registry.lookup("pruner", name) for name in ("magnitude", "wanda", "sparsegpt")}
    assert [entry.needs_calibration for entry in facts.values()] == [False, True, True]
    assert [entry.updates_kept_weights for entry in facts.values()] == [False, False, True]
