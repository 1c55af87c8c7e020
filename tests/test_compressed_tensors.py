"""compressed-tensors' sparse-24-bitmask: our export against a directory the library itself wrote.

`fixtures/compressed_tensors_llama/` was written by compressed-tensors 0.14.0.1's `ModelCompressor` under
transformers 4.57.6 (see `fixtures/make_compressed_tensors_fixture.py`, which also checked that both the
library and transformers 4.57 load semisparse's export of the same model bit for bit). These tests need
neither: they compare files and use semisparse's own reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from semisparse import compressed_tensors as ct
from semisparse.cli import main
from semisparse.compressed import is_compressed_dir
from semisparse.errors import SemisparseError
from semisparse.export import provenance, save_model_dir
from semisparse.models import load_model
from semisparse.pruning import MagnitudeConfig, prune

FIXTURE = Path(__file__).parent / "fixtures" / "compressed_tensors_llama"
REFERENCE = FIXTURE / "dense_reference.safetensors"
LAYER = "model.layers.0.mlp.down_proj"


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def read(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def reference_model() -> PreTrainedModel:
    """The fixture's pruned model, dense, built from its config (bfloat16, as the library saved it)."""
    config = AutoConfig.from_pretrained(FIXTURE)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(load_file(str(REFERENCE)))
    return model.eval()


def assert_state_equals(model: torch.nn.Module, expected: dict[str, torch.Tensor], dtype=None) -> None:
    state = model.state_dict()
    assert set(expected) <= set(state)
    for key, value in expected.items():
        want = value if dtype is None else value.to(dtype)
        assert state[key].dtype == want.dtype, key
        assert torch.equal(state[key], want), key


def sparse_dir(tmp_path: Path, tie: bool = False) -> Path:
    """A saved 2:4 tiny Llama (fp32) with tokenizer and semisparse.json, as `semisparse prune` writes."""
    model = make_tiny_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    prune(model, MagnitudeConfig())
    meta = provenance(base_model="tiny", method="magnitude", pattern="2:4", include=[], exclude=[])
    return save_model_dir(model, make_tiny_tokenizer(), tmp_path / "sparse", meta)


def test_export_matches_the_library_written_fixture(tmp_path: Path) -> None:
    ct.save_compressed_tensors(reference_model(), tmp_path)
    ours_meta, ours = read(tmp_path / "model.safetensors")
    theirs_meta, theirs = read(FIXTURE / "model.safetensors")
    assert ours_meta == theirs_meta == {"format": "pt"}
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key  # values, bitmasks and shapes byte for byte
    assert theirs[f"{LAYER}.shape"].dtype == torch.int64 and theirs[f"{LAYER}.shape"].shape == (2, 1)
    assert theirs[f"{LAYER}.bitmask"].shape == (64, 128 // 8)
    assert theirs[f"{LAYER}.compressed"].shape == (64, 64)
    assert f"{LAYER}.weight" not in theirs
    # even the files are identical (same tensors, same header, same order)
    assert (tmp_path / "model.safetensors").read_bytes() == (FIXTURE / "model.safetensors").read_bytes()

    ours_config, theirs_config = config_json(tmp_path), config_json(FIXTURE)
    block, expected = ours_config["quantization_config"], theirs_config["quantization_config"]
    assert block.keys() == expected.keys()
    assert isinstance(block["version"], str)  # the library writes its own version; readers ignore it
    assert {k: v for k, v in block.items() if k != "version"} == {
        k: v for k, v in expected.items() if k != "version"
    }
    assert block["sparsity_config"]["global_sparsity"] == pytest.approx(
        expected["sparsity_config"]["global_sparsity"]
    )
    # every model field transformers 4.57 wrote is there with the same value (rope_theta included)
    for key, value in theirs_config.items():
        if key not in ("transformers_version", "quantization_config"):
            assert ours_config.get(key) == value, key


def test_load_model_reads_the_library_written_fixture_bit_exactly() -> None:
    expected = load_file(str(REFERENCE))
    assert ct.is_compressed_tensors_dir(FIXTURE) and not is_compressed_dir(FIXTURE)
    model = load_model(str(FIXTURE), dtype=torch.bfloat16)
    assert set(model.state_dict()) == set(expected)
    assert_state_equals(model, expected)
    assert_state_equals(load_model(str(FIXTURE)), expected, torch.float32)  # the default float32
    assert not hasattr(model.config, "quantization_config")
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    out = model.generate(torch.tensor([[1, 5, 9, 17]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    # the same tokens transformers 4.57 + compressed-tensors 0.14.0.1 generated from this directory
    assert out.tolist()[0] == [1, 5, 9, 17, 28, 111, 15, 32, 161, 245, 15, 32]


def test_info_on_the_library_written_fixture_reports_24() -> None:
    code, output, _ = run("info", FIXTURE)
    assert code == 0, output
    assert "14 target layers, 50.00% zeros overall, pattern 2:4: 0 violations" in output


def test_compress_command_round_trips_tied_and_untied(tmp_path: Path) -> None:
    for tie in (False, True):
        root = tmp_path / f"tie{tie}"
        source = sparse_dir(root, tie)
        out = root / "ct"
        code, output, _ = run("compress", source, "-o", out, "--format", "compressed-tensors")
        assert code == 0, output
        assert sorted(p.name for p in out.iterdir() if p.name.endswith("safetensors")) == [
            "model.safetensors"
        ]
        meta = json.loads((out / "semisparse.json").read_text())
        assert meta["compressed"]["format"] == "compressed-tensors/sparse-24-bitmask"
        assert meta["pattern"] == "2:4"
        block = config_json(out)["quantization_config"]
        assert block["sparsity_config"]["ignore"] == ["lm_head"]
        assert config_json(out)["rope_theta"] == config_json(source)["rope_parameters"]["rope_theta"]
        _, tensors = read(out / "model.safetensors")
        assert ("lm_head.weight" in tensors) is not tie
        dense = load_model(str(source))
        assert_state_equals(load_model(str(out)), dense.state_dict())
        code, output, _ = run("info", out)
        assert code == 0 and "pattern 2:4: 0 violations" in output, output
        code, output, _ = run("decompress", out, "-o", root / "plain")
        assert code == 0, output
        assert_state_equals(AutoModelForCausalLM.from_pretrained(root / "plain"), dense.state_dict())
        assert "quantization_config" not in config_json(root / "plain")


def test_semisparse_format_stays_the_default_and_converts_the_fixture(tmp_path: Path) -> None:
    code, output, _ = run("compress", FIXTURE, "-o", tmp_path / "ours")
    assert code == 0, output
    assert is_compressed_dir(tmp_path / "ours")
    assert_state_equals(load_model(str(tmp_path / "ours"), dtype=torch.bfloat16), load_file(str(REFERENCE)))
    code, _, err = run("compress", FIXTURE, "-o", tmp_path / "again", "--format", "compressed-tensors")
    assert code == 2 and "already compressed" in err and len(err.strip().splitlines()) == 1


def test_quantized_and_conv1d_models_are_refused_in_one_line(tmp_path: Path) -> None:
    source = sparse_dir(tmp_path)
    code, output, _ = run(
        "quantize", source, "-o", tmp_path / "int8", "--method", "rtn", "--bits", 8, "--quiet"
    )
    assert code == 0, output
    code, _, err = run("compress", tmp_path / "int8", "-o", tmp_path / "x", "--format", "compressed-tensors")
    assert code == 2 and "quantized" in err and len(err.strip().splitlines()) == 1
    gpt2 = make_tiny_model("gpt2")
    prune(gpt2, MagnitudeConfig())
    with pytest.raises(SemisparseError, match="Conv1D layer, which compressed-tensors does not store"):
        ct.save_compressed_tensors(gpt2, tmp_path)
    with pytest.raises(SemisparseError, match="no 2:4 layers"):
        ct.save_compressed_tensors(make_tiny_model("llama"), tmp_path)
    assert not (tmp_path / "x").exists()


def test_non_24_linears_are_kept_dense_and_listed_in_ignore(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    prune(model, MagnitudeConfig())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.normal_()
    stored, block = ct.compressed_tensors_state(model)
    assert block["sparsity_config"]["ignore"] == ["model.layers.1.mlp.up_proj", "lm_head"]
    assert (
        "model.layers.1.mlp.up_proj.weight" in stored and "model.layers.1.mlp.up_proj.bitmask" not in stored
    )
    ct.save_compressed_tensors(model, tmp_path)
    assert_state_equals(ct.load_compressed_tensors(tmp_path), model.state_dict())
    assert ct.saved_pattern(tmp_path, model) == ("2:4", ["model.layers.1.mlp.up_proj"])


def test_a_group_with_fewer_than_two_nonzeros_marks_its_first_zeros() -> None:
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    tensors = ct.layer_tensors("l", w)
    assert tensors["l.shape"].tolist() == [[1], [8]]
    assert tensors["l.bitmask"].tolist() == [[0b00111010]]
    assert tensors["l.compressed"].tolist() == [[1.5, -2.0, 3.0, 0.0]]


@pytest.fixture
def fixture_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "copy"))


def _edit(directory: Path, edit) -> None:
    metadata, tensors = read(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)


def test_corrupt_or_unsupported_directories_are_one_line_errors(fixture_copy: Path) -> None:
    file = fixture_copy / "model.safetensors"
    original = file.read_bytes()

    def check(match: str) -> None:
        with pytest.raises(SemisparseError, match=match):
            load_model(str(fixture_copy))
        code, _, err = run("info", fixture_copy)
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err

    file.write_bytes(original[:1000])
    check("not a valid compressed-tensors checkpoint")
    file.write_bytes(original)
    _edit(fixture_copy, lambda t: t.pop(f"{LAYER}.bitmask"))
    check(f"{LAYER}.bitmask is missing")
    file.write_bytes(original)
    _edit(
        fixture_copy, lambda t: t.__setitem__(f"{LAYER}.bitmask", torch.full_like(t[f"{LAYER}.bitmask"], 255))
    )
    check("exactly 2 of every 4")
    file.write_bytes(original)
    _edit(
        fixture_copy,
        lambda t: t.__setitem__(f"{LAYER}.compressed", t[f"{LAYER}.compressed"][:, :-2].contiguous()),
    )
    check("compressed has shape")
    file.write_bytes(original)
    _edit(fixture_copy, lambda t: t.pop("model.norm.weight"))
    check("missing model.norm.weight")
    file.unlink()
    check("no model.safetensors")
    file.write_bytes(original)
    config = config_json(fixture_copy)
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    (fixture_copy / "config.json").write_text(json.dumps(config))
    check("quantized compressed-tensors checkpoint")
    config["quantization_config"].pop("config_groups")
    config["quantization_config"]["sparsity_config"]["format"] = "sparse-bitmask"
    (fixture_copy / "config.json").write_text(json.dumps(config))
    check("format 'sparse-bitmask'")
