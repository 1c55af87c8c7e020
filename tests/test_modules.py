"""Target selection and weight access (`semisparse.modules`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from semisparse.errors import SemisparseError
from semisparse.modules import (
    GlobFilter,
    context_length,
    decoder_blocks,
    find_targets,
    layer_filter,
    set_submodule,
    set_weight_matrix,
    weight_matrix,
)

LLAMA_BLOCK = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BLOCK_TARGETS = {
    "llama": ("model.layers", LLAMA_BLOCK),
    "qwen2": ("model.layers", LLAMA_BLOCK),
    "mistral": ("model.layers", LLAMA_BLOCK),
    "opt": (
        "model.decoder.layers",
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    ),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
}


def test_find_targets_selects_every_block_linear_in_model_order(tiny_model: nn.Module) -> None:
    prefix, per_block = BLOCK_TARGETS[tiny_model.config.model_type]
    targets = find_targets(tiny_model)
    expected = [f"{prefix}.{i}.{suffix}" for i in range(2) for suffix in per_block]
    assert list(targets) == expected
    named = dict(tiny_model.named_modules())
    assert all(targets[name] is named[name] for name in targets)
    assert all(isinstance(module, nn.Linear | Conv1D) for module in targets.values())


def test_decoder_blocks_are_the_family_block_list(tiny_model: nn.Module) -> None:
    prefix, _ = BLOCK_TARGETS[tiny_model.config.model_type]
    blocks = decoder_blocks(tiny_model)
    assert blocks is dict(tiny_model.named_modules())[prefix]
    assert len(blocks) == tiny_model.config.num_hidden_layers == 2


class _Wrapped(nn.Module):
    """An unknown architecture whose blocks live under an unusual attribute name."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=n_layers)
        self.heads = nn.ModuleList([nn.Linear(8, 8)])
        self.stack = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(n_layers))
        self.lm_head = nn.Linear(8, 8)


def test_decoder_blocks_generic_fallback_matches_num_hidden_layers() -> None:
    model = _Wrapped(3)
    assert decoder_blocks(model) is model.stack
    assert list(find_targets(model)) == [f"stack.{i}.{j}" for i in range(3) for j in range(2)]


def test_decoder_blocks_unknown_model_is_a_user_error() -> None:
    with pytest.raises(SemisparseError, match="decoder blocks"):
        decoder_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_include_and_exclude_patterns() -> None:
    model = make_tiny_model("llama")
    mlp = find_targets(model, layer_filter(include=["*.mlp.*"]))
    assert list(mlp) == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    no_first_block = find_targets(model, layer_filter(exclude=["model.layers.0.*"]))
    assert len(no_first_block) == 7
    assert all(name.startswith("model.layers.1.") for name in no_first_block)
    both = find_targets(model, layer_filter(["*.mlp.*", "*.q_proj"], ["*.down_proj"]))
    kept = ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")
    assert list(both) == [f"model.layers.{i}.{s}" for i in range(2) for s in kept]
    with pytest.raises(SemisparseError, match="no layers to prune") as caught:
        find_targets(model, layer_filter(include=["*.nonexistent"]))
    assert "include=['*.nonexistent'], exclude=[]" in str(caught.value)


def test_non_multiple_input_size_names_layer_and_fix() -> None:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=90,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    with pytest.raises(SemisparseError) as caught:
        find_targets(model, m=4)
    message = str(caught.value)
    assert "model.layers.0.mlp.down_proj has 90 inputs, not a multiple of 4" in message
    assert "leave it out with `exclude`" in message
    assert len(find_targets(model, layer_filter(exclude=["*.down_proj"]), m=4)) == 12
    assert len(find_targets(model, m=2)) == 14


def test_weight_matrix_is_out_by_in_and_set_round_trips(tiny_model: nn.Module) -> None:
    torch.manual_seed(1)
    for name, module in find_targets(tiny_model).items():
        w = weight_matrix(module)
        out_features, in_features = w.shape
        x = torch.randn(3, in_features)
        bias = module.bias if module.bias is not None else torch.zeros(out_features)
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ w.T + bias, msg=name)
            new = torch.randn(out_features, in_features)
            set_weight_matrix(module, new)
            torch.testing.assert_close(module(x), x @ new.T + bias, msg=name)
        torch.testing.assert_close(weight_matrix(module), new)
        if isinstance(module, Conv1D):
            assert module.weight.shape == (in_features, out_features)
            torch.testing.assert_close(module.weight, new.T)


def test_set_weight_matrix_rejects_wrong_shape() -> None:
    module = make_tiny_model("gpt2").transformer.h[0].attn.c_attn
    with pytest.raises(ValueError, match="does not fit"):
        set_weight_matrix(module, torch.zeros(64, 192))


@pytest.mark.parametrize("arch", ARCHS)
def test_context_length(arch: str) -> None:
    assert context_length(make_tiny_model(arch)) == 256


def test_context_length_without_config_is_a_user_error() -> None:
    with pytest.raises(SemisparseError, match="`seqlen`"):
        context_length(nn.Linear(2, 2))


def test_filter_fn_sees_module_and_full_name() -> None:
    model = make_tiny_model("gpt2")
    seen: list[tuple[type, str]] = []

    def wide_outputs(module: nn.Module, name: str) -> bool:
        seen.append((type(module), name))
        return weight_matrix(module).shape[0] > weight_matrix(module).shape[1]

    targets = find_targets(model, wide_outputs)
    assert [name for _, name in seen] == list(find_targets(model))
    assert all(kind is Conv1D for kind, _ in seen)
    assert list(targets) == [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_attn", "mlp.c_fc")]
    with pytest.raises(SemisparseError, match=r"no layers to prune \(filter .*reject_all\)"):

        def reject_all(module: nn.Module, name: str) -> bool:
            return False

        find_targets(model, reject_all)


def test_layer_filter_is_a_frozen_readable_glob_filter() -> None:
    selected = layer_filter(["*.mlp.*"], ("*.down_proj",))
    assert selected == GlobFilter(("*.mlp.*",), ("*.down_proj",))
    assert str(selected) == "include=['*.mlp.*'], exclude=['*.down_proj']"
    assert str(layer_filter()) == "include=[], exclude=[]"
    linear = nn.Linear(4, 4)
    assert selected(linear, "model.layers.0.mlp.up_proj")
    assert not selected(linear, "model.layers.0.mlp.down_proj")
    assert not selected(linear, "model.layers.0.self_attn.q_proj")
    assert layer_filter()(linear, "anything")
    with pytest.raises(dataclasses.FrozenInstanceError):
        selected.include = ()  # type: ignore[misc]


def test_set_submodule_replaces_nested_and_top_level_modules() -> None:
    model = make_tiny_model("llama")
    new = nn.Linear(64, 64, bias=False)
    set_submodule(model, "model.layers.1.self_attn.q_proj", new)
    assert model.model.layers[1].self_attn.q_proj is new
    head = nn.Linear(64, 256, bias=False)
    set_submodule(model, "lm_head", head)
    assert model.lm_head is head
    with pytest.raises(AttributeError):
        set_submodule(model, "model.nonexistent.q_proj", new)
