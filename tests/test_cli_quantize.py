"""`semisparse quantize / compress / decompress` end to end on a tiny 2:4 model; bad input fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from semisparse import nm
from semisparse.cli import main
from semisparse.compressed import COMPRESSED_FILE, is_compressed_dir, load_compressed
from semisparse.export import provenance, save_model_dir
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.quantization.gridfile import GRID_FILE
from semisparse.sizes import size_report


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Path:
    model = make_tiny_model("llama")
    prune(model, MagnitudeConfig())
    meta = provenance(base_model="tiny", method="magnitude", pattern="2:4", include=[], exclude=[])
    return save_model_dir(model, make_tiny_tokenizer(), tmp_path / "sparse", meta)


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def hidden_leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_quantize_gptq_then_compress_and_decompress(
    tmp_path: Path, sparse_dir: Path, calib_file: Path
) -> None:
    out = tmp_path / "int4"
    args = ["--bits", 4, "--method", "gptq", "--group-size", 32, "--calibration", calib_file]
    code, output, _ = run(
        "quantize", sparse_dir, "-o", out, *args, "--nsamples", 4, "--seqlen", 32, "--quiet"
    )
    assert code == 0, output
    assert "16.0x smaller than fp32 counting values only" in output
    meta = json.loads((out / "semisparse.json").read_text())
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["group_size"] == 32
    assert meta["quantization"]["calibration"]["n_samples"] == 4
    assert meta["method"] == "magnitude+gptq-int4" and meta["pattern"] == "2:4"
    assert meta["sizes"]["times_smaller"]["dense_fp32/values_only"] == 16.0
    assert (out / GRID_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)  # the dequantized form loads in plain transformers
    assert all(nm.is_nm(weight_matrix(m), 2, 4) for m in find_targets(plain).values())

    packed = tmp_path / "int4-packed"
    code, output, _ = run("compress", out, "-o", packed)
    assert code == 0, output
    assert is_compressed_dir(packed)
    assert (
        json.loads((packed / "semisparse.json").read_text())["on_disk_bytes"]["this"]
        < meta["on_disk_bytes"]["this"]
    )
    assert size_report(packed).totals() == size_report(out).totals() == meta["sizes"]["bytes"]
    unpacked = tmp_path / "int4-unpacked"
    code, output, _ = run("decompress", packed, "-o", unpacked)
    assert code == 0, output
    original, restored = load_model(str(out)).state_dict(), load_model(str(unpacked)).state_dict()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert (unpacked / GRID_FILE).is_file()
    direct = load_model(str(packed)).state_dict()  # load_model reads the compressed form itself
    assert all(torch.equal(original[k], direct[k]) for k in original)


def test_quantize_rtn_straight_to_compressed(tmp_path: Path, sparse_dir: Path) -> None:
    out = tmp_path / "int8"
    code, output, _ = run("quantize", sparse_dir, "-o", out, "--bits", 8, "--method", "rtn", "--per-channel",
                          "--compressed")  # fmt: skip
    assert code == 0, output
    assert (out / COMPRESSED_FILE).is_file() and not (out / "model.safetensors").exists()
    model = load_compressed(out)
    reference = load_model(str(sparse_dir))
    for name, module in find_targets(model).items():
        w, w0 = weight_matrix(module), weight_matrix(dict(find_targets(reference))[name])
        assert nm.is_nm(w, 2, 4) and torch.all(w[w0 == 0] == 0)
        assert (w - w0).abs().max() <= w0.abs().max() / 254 + 1e-6
    assert json.loads((out / "semisparse.json").read_text())["quantization"]["group_size"] is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--bits", "3"], "'3' is not one of '4', '8'"),
        (["--group-size", "0", "--method", "rtn"], "--group-size=0 must be >= 1"),
        (["--calibration", "/nonexistent/file.txt", "--seqlen", "32"], "unknown calibration source"),
    ],
)
def test_bad_input_fails_with_error_and_writes_nothing(
    tmp_path: Path, sparse_dir: Path, extra: list[str], expected: str
) -> None:
    out = tmp_path / "bad"
    code, output, _ = run("quantize", sparse_dir, "-o", out, "--quiet", *extra)
    assert code == 2
    assert expected in output
    assert not out.exists() and hidden_leftovers(tmp_path) == []


def test_user_errors_of_compress_and_decompress(tmp_path: Path, sparse_dir: Path) -> None:
    dense = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(dense)
    make_tiny_tokenizer().save_pretrained(dense)
    code, _, stderr = run("compress", dense, "-o", tmp_path / "c")
    assert code == 2 and stderr.startswith("error:") and "no 2:4 layers" in stderr
    code, _, stderr = run("quantize", dense, "-o", tmp_path / "c", "--method", "rtn", "--compressed")
    assert code == 2 and "is quantized but not 2:4" in stderr  # fails while writing: nothing left behind
    code, _, stderr = run("decompress", sparse_dir, "-o", tmp_path / "d")
    assert code == 2 and "not a compressed model directory" in stderr
    code, _, stderr = run("compress", sparse_dir, "-o", sparse_dir)
    assert code == 2 and "already exists" in stderr
    assert (
        not (tmp_path / "c").exists() and not (tmp_path / "d").exists() and hidden_leftovers(tmp_path) == []
    )
