"""The sequential engine's speed-ups change no result: layers that read the same input share one Hessian,
several samples go through a block per forward, and the timings say where the time went."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, VOCAB_SIZE, make_tiny_model
from torch import nn

from semisparse import registry
from semisparse.modules import find_targets
from semisparse.nm import NMPattern
from semisparse.pruning import engine, prune, pruner_config
from semisparse.pruning.engine import PruneTimings, run_sequential
from semisparse.pruning.sparsegpt import SparseGPTPruner
from semisparse.quantization import quantizer_config

# Targets per block that read another target's input: q/k/v -> 2, gate/up -> 1; GPT-2 fuses q/k/v.
FOLLOWERS_PER_BLOCK = {"llama": 3, "qwen2": 3, "mistral": 3, "opt": 2, "gpt2": 0}


def calibration(n: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n, seqlen), generator=torch.Generator().manual_seed(3))


def pruned_state(arch: str, method: str = "sparsegpt", **engine_kw: object) -> dict[str, torch.Tensor]:
    model = make_tiny_model(arch)
    kind = "quantizer" if method == "gptq" else "pruner"
    config = quantizer_config("gptq", bits=4, group_size=None) if method == "gptq" else None
    config = config or pruner_config(method, pattern="2:4")
    entry = registry.for_config(config, kind)
    run_sequential(
        model,
        find_targets(model),
        lambda name, module: entry.implementation(name, module, config),
        calibration(),
        progress=False,
        **engine_kw,
    )
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "gptq"])
def test_shared_statistics_give_the_same_bits(arch: str, method: str) -> None:
    timings = PruneTimings()
    shared = pruned_state(arch, method, share_statistics=True, timings=timings)
    assert_same_bits(shared, pruned_state(arch, method, share_statistics=False))
    assert timings.shared_statistics == 2 * FOLLOWERS_PER_BLOCK[arch]  # two blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_block_forwards_give_the_same_bits(arch: str) -> None:
    timings = PruneTimings()
    batched = pruned_state(arch, samples_per_forward=4, timings=timings)  # chunks of 4 and 2
    assert timings.samples_per_forward == 4
    assert_same_bits(batched, pruned_state(arch, samples_per_forward=1))
    default = PruneTimings()
    assert_same_bits(batched, pruned_state(arch, timings=default))
    assert default.samples_per_forward == 6  # 6 x 16 tokens fit in one forward


@pytest.mark.parametrize("arch", ARCHS)
def test_timings_account_for_the_run_and_every_block_takes_the_causal_fast_path(arch: str) -> None:
    model = make_tiny_model(arch)
    timings = PruneTimings()
    prune(model, pruner_config("sparsegpt", pattern="2:4"), calibration_ids=calibration(), progress=False,
          timings=timings)  # fmt: skip
    assert timings.blocks == 2 and timings.masked_blocks == 0
    parts = ("capture", "feed_forwards", "statistics", "layer_updates", "next_forwards")
    assert all(getattr(timings, part) > 0 for part in parts)
    assert sum(getattr(timings, part) for part in parts) <= timings.total + 1e-9
    record = timings.to_dict()
    assert record["block_forwards"] == pytest.approx(timings.feed_forwards + timings.next_forwards)
    assert record["ratio"] == pytest.approx(timings.total / timings.block_forwards)


def test_a_sharing_that_breaks_in_a_later_forward_falls_back_to_own_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = pruned_state("llama", share_statistics=False)
    original = engine._InputSharing.follows
    forwards = {"seen": 0}

    def flaky(self: engine._InputSharing, name: str, inp: torch.Tensor) -> bool:
        # k_proj of the first block gets a copy of its input in the second forward: a different tensor
        if self.enabled and name.endswith("0.self_attn.k_proj") and not self._first_forward:
            forwards["seen"] += 1
            inp = inp.clone()
        return original(self, name, inp)

    monkeypatch.setattr(engine._InputSharing, "follows", flaky)
    timings = PruneTimings()
    assert_same_bits(pruned_state("llama", samples_per_forward=2, timings=timings), expected)
    assert forwards["seen"] == 1
    assert timings.shared_statistics == 3  # block 0 redone without sharing; block 1 shares as usual


def layer_pruners() -> dict[str, SparseGPTPruner]:
    return {name: SparseGPTPruner(nn.Linear(8, 4), NMPattern(2, 4), None) for name in "abc"}


def test_sharing_needs_the_same_live_tensor_unchanged() -> None:
    sharing = engine._InputSharing(layer_pruners(), enabled=True)
    x = torch.randn(1, 3, 8)
    assert not sharing.follows("a", x)
    assert sharing.follows("b", x)
    assert not sharing.follows("c", x.clone())  # equal values, other memory: not recognised, not wrong
    sharing.end_forward()
    assert sharing.leader == {"b": "a"}

    y = torch.randn(1, 3, 8)
    assert not sharing.follows("a", y)
    y.add_(1)  # changed in place after `a` read it: `b` no longer gets what `a` got
    with pytest.raises(engine._SharingMismatch):
        sharing.follows("b", y)


def test_a_follower_must_be_called_as_often_as_its_leader() -> None:
    sharing = engine._InputSharing(layer_pruners(), enabled=True)
    x = torch.randn(1, 3, 8)
    sharing.follows("a", x)
    sharing.follows("b", x)
    sharing.end_forward()
    sharing.follows("a", x)
    with pytest.raises(engine._SharingMismatch):
        sharing.end_forward()


def test_pruners_of_different_types_do_not_share() -> None:
    class Other(SparseGPTPruner):
        pass

    pruners = layer_pruners()
    pruners["b"] = Other(nn.Linear(8, 4), NMPattern(2, 4), None)
    sharing = engine._InputSharing(pruners, enabled=True)
    x = torch.randn(1, 3, 8)
    assert not sharing.follows("a", x) and not sharing.follows("b", x)
    assert sharing.follows("c", x)
    sharing.end_forward()
    assert sharing.leader == {"c": "a"}


def test_hooked_inputs_split_back_into_samples_or_not_at_all() -> None:
    x = torch.randn(3, 5, 8)
    assert all(torch.equal(a, b) for a, b in zip(engine._per_sample(x, 3, 5), x.split(1), strict=True))
    flat = x.reshape(-1, 8)  # OPT flattens the tokens before its MLP
    parts = engine._per_sample(flat, 3, 5)
    assert all(torch.equal(a, b[0]) for a, b in zip(parts, x.split(1), strict=True))
    with pytest.raises(engine._NotBatchable):
        engine._per_sample(flat[:7], 3, 5)  # tokens routed to one expert: no sample boundaries


def test_an_input_that_does_not_split_by_sample_falls_back_to_one_sample_per_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = pruned_state("llama", samples_per_forward=1)
    original = engine._per_sample

    def unsplittable(inp: torch.Tensor, batch: int, seqlen: int) -> list[torch.Tensor]:
        if batch > 1:
            raise engine._NotBatchable
        return original(inp, batch, seqlen)

    monkeypatch.setattr(engine, "_per_sample", unsplittable)
    timings = PruneTimings()
    assert_same_bits(pruned_state("llama", timings=timings), expected)
    assert timings.samples_per_forward == 1


@pytest.mark.parametrize("cols", [8, 200, 576])
def test_upper_triangle_accumulation_is_the_full_gram_matrix(cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    batches = [
        torch.randn(1, 33, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) for _ in range(3)
    ]
    pruner = SparseGPTPruner(nn.Linear(cols, 4), NMPattern(2, 4), None)
    full = torch.zeros(cols, cols)
    for n, batch in enumerate(batches, start=1):
        pruner.add_batch(batch)
        x = batch.reshape(-1, cols) * (2 / n) ** 0.5
        full.mul_((n - 1) / n).addmm_(x.t(), x)
        assert torch.equal(pruner.hessian, pruner.hessian.t())  # read between batches, then accumulate on
        assert torch.allclose(pruner.hessian, full, rtol=1e-5, atol=1e-4 * full.abs().max().item())


@pytest.mark.parametrize(("pattern", "sparsity"), [(NMPattern(2, 4), None), (None, 0.5)])
def test_layers_sharing_a_hessian_pruned_in_one_sweep_match_separate_sweeps(pattern, sparsity) -> None:
    """N:M rows are independent given one H⁻¹, so stacking q/k/v-like layers changes no bit; unstructured
    sparsity ranks whole column blocks, so there each layer keeps its own sweep (also no change)."""
    torch.manual_seed(0)
    layers = [nn.Linear(32, rows, bias=False) for rows in (32, 8, 8)]
    x = torch.randn(4, 64, 32) @ torch.randn(32, 32)

    def pruners(modules: list[nn.Linear]) -> list[SparseGPTPruner]:
        made = [SparseGPTPruner(module, pattern, sparsity, blocksize=16) for module in modules]
        made[0].add_batch(x)
        for follower in made[1:]:
            follower.adopt_statistics(made[0])
        return made

    copies = [nn.Linear(32, layer.out_features, bias=False) for layer in layers]
    for copy, layer in zip(copies, layers, strict=True):
        copy.weight.data.copy_(layer.weight.data)
    leader, *followers = pruners(layers)
    leader.prune_together(followers)
    for pruner in pruners(copies):
        pruner.prune()
    for layer, copy in zip(layers, copies, strict=True):
        assert torch.equal(layer.weight, copy.weight)


@pytest.mark.parametrize("path", ["syrk", "blocks"])
def test_both_gram_paths_update_the_upper_triangle(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from semisparse.pruning import gram

    if path == "blocks":
        monkeypatch.setattr(gram, "_syrk_upper", lambda *args: False)
    else:
        assert gram._cpu_blas() is not None, "scipy's BLAS is a dependency: the CPU path must be ssyrk"
        assert torch.get_num_threads() == 1  # tests run on one thread (conftest), where ssyrk is used
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(70, 300, generator=gen)
    start = torch.randn(300, 300, generator=gen)
    hessian = start.clone()
    gram.add_upper_gram(hessian, x.t().contiguous().t(), beta=0.25, alpha=3.0)  # column-major x
    expected = 0.25 * start + 3.0 * x.t() @ x
    upper = torch.ones(300, 300, dtype=torch.bool).triu()
    assert torch.allclose(hessian[upper], expected[upper], rtol=1e-5, atol=1e-3)
