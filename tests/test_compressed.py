"""Compressed 2:4 checkpoints: bit-exact round trips, the documented layout, sizes, corrupt files rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from semisparse import compressed, nm
from semisparse.errors import SemisparseError
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.quantization import RTNConfig, quantize, rtn_quantize
from semisparse.sizes import dir_bytes, size_report


def sparse_model(arch: str = "llama", dtype: torch.dtype = torch.float32):
    model = make_tiny_model(arch)
    prune(model, MagnitudeConfig())
    return model.to(dtype)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path: Path, arch: str, dtype: torch.dtype) -> None:
    model = sparse_model(arch, dtype)
    compressed.save_compressed(model, tmp_path, None)
    assert compressed.is_compressed_dir(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_state(model, compressed.load_compressed(tmp_path, dtype=dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_round_trip_gives_the_dequantized_values(
    tmp_path: Path, bits: int, symmetric: bool
) -> None:
    model = sparse_model("gpt2")
    codes = quantize(model, RTNConfig(bits=bits, group_size=32, symmetric=symmetric))
    compressed.save_compressed(model, tmp_path, codes)
    loaded, loaded_codes = compressed.load_compressed_with_codes(tmp_path)
    assert_same_state(model, loaded)
    assert set(loaded_codes) == set(codes)
    for name, qw in loaded_codes.items():
        assert torch.equal(qw.scales, codes[name].scales)
        assert torch.equal(qw.dequantize(), codes[name].dequantize())


def test_layout_of_one_layer(tmp_path: Path) -> None:
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    tensors, info = compressed.compressed_tensors_of("l.weight", w, None, transposed=False)
    assert info == {"dtype": "float32", "transposed": False}
    assert tensors["l.weight.shape"].tolist() == [1, 8]
    # group 2 has one non-zero: its first zero (column 5) is marked kept and stored as 0
    assert tensors["l.weight.bitmask"].tolist() == [[0b00111010]]
    assert tensors["l.weight.compressed"].tolist() == [[1.5, -2.0, 3.0, 0.0]]
    q = rtn_quantize(w, w != 0, bits=4, group_size=None)
    tensors, info = compressed.compressed_tensors_of("l.weight", q.dequantize(), q, transposed=False)
    assert info["bits"] == 4 and info["symmetric"] is False
    codes = q.codes[0].tolist()
    zero = int(q.zeros[0, 0])
    kept = [codes[1], codes[3], codes[4], zero]
    assert tensors["l.weight.packed"].tolist() == [[kept[0] | kept[1] << 4, kept[2] | kept[3] << 4]]


def test_size_report_on_a_hand_computable_layer() -> None:
    model = sparse_model("llama")
    codes = quantize(model, RTNConfig(bits=4, group_size=32))
    report = size_report(model, codes)
    layer = next(item for item in report.layers if item.name.endswith("layers.0.mlp.down_proj"))
    assert layer.shape == (64, 128) and layer.is_24 and layer.kept == 64 * 64 and layer.value_bits == 4
    assert layer.grid_bytes == 64 * 4 * (2 + 1)  # 4 groups per row: fp16 scale + uint8 zero
    # whole model: q,k,v,o (64x64, 32x64, 32x64, 64x64) + gate/up (128x64) + down (64x128), 2 blocks
    weights = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    totals = report.totals()
    assert totals["dense_fp32"] == 4 * weights and totals["dense_bf16"] == 2 * weights
    assert totals["values"] == weights // 2 * 4 // 8
    assert totals["metadata_hw_2bit_per_kept"] == weights // 2 * 2 // 8
    assert totals["metadata_bitmask_1bit_per_weight"] == weights // 8
    groups = 2 * (64 * 2 * 2 + 32 * 2 * 2 + 128 * 2 * 2 + 64 * 4)  # rows x groups per row
    assert totals["grids"] == 3 * groups
    ratios = report.ratios()
    assert ratios["dense_fp32/values_only"] == 16.0
    with_meta = 4 * weights / (weights // 4 + weights // 8 + 3 * groups)
    assert ratios["dense_fp32/values_grids_hw_metadata"] == pytest.approx(with_meta)
    assert "| kept values only" in report.markdown()


def test_compressed_is_smaller_on_disk_than_dense(tmp_path: Path) -> None:
    model = sparse_model("llama")
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "plain").mkdir()
    (tmp_path / "int4").mkdir()
    compressed.save_compressed(model, tmp_path / "plain", None)
    codes = quantize(model, RTNConfig(bits=4, group_size=32))
    compressed.save_compressed(model, tmp_path / "int4", codes)
    dense, plain, int4 = (dir_bytes(tmp_path / name) for name in ("dense", "plain", "int4"))
    targets = size_report(model).totals()["dense_fp32"]
    # the 2:4 targets shrink to values + bitmask; embeddings and norms are unchanged
    assert plain < dense - targets * 0.4
    assert int4 < plain - targets * 0.3


def test_non_24_targets_are_kept_dense_and_round_trip(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    compressed.save_compressed(model, tmp_path, None)
    with safe_open(str(tmp_path / compressed.COMPRESSED_FILE), framework="pt") as handle:
        assert json.loads(handle.metadata()["layers"]) == {}
    assert_same_state(model, compressed.load_compressed(tmp_path))


def _rewrite(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_corrupt_files_are_rejected_with_clear_errors(tmp_path: Path) -> None:
    model = sparse_model("llama")
    compressed.save_compressed(model, tmp_path, None)
    file = tmp_path / compressed.COMPRESSED_FILE
    key = "model.layers.0.mlp.up_proj.weight"
    original = file.read_bytes()

    def check(edit, match: str) -> None:
        file.write_bytes(original)
        _rewrite(file, edit)
        with pytest.raises(SemisparseError, match=match):
            compressed.load_compressed(tmp_path)

    check(lambda t, m: t.pop(f"{key}.bitmask"), "bitmask is missing")
    check(
        lambda t, m: t.__setitem__(f"{key}.bitmask", torch.full_like(t[f"{key}.bitmask"], 0xFF)), "exactly 2"
    )
    check(
        lambda t, m: t.__setitem__(f"{key}.compressed", t[f"{key}.compressed"][:, :-1].contiguous()), "shape"
    )
    check(lambda t, m: m.__setitem__("format", "other"), "format is 'other'")
    check(lambda t, m: m.__setitem__("format_version", "9"), "upgrade semisparse")
    check(lambda t, m: t.pop("model.norm.weight"), "missing model.norm.weight")
    file.write_bytes(original[:1000])
    with pytest.raises(SemisparseError, match="not a valid compressed checkpoint"):
        compressed.load_compressed(tmp_path)
    with pytest.raises(SemisparseError, match="not a compressed model directory"):
        compressed.load_compressed(tmp_path / "nowhere")


def test_quantized_layers_must_be_24(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    codes = quantize(model, RTNConfig(bits=8, group_size=None))
    with pytest.raises(SemisparseError, match="not 2:4"):
        compressed.save_compressed(model, tmp_path, codes)
    assert not nm.is_nm(next(iter(codes.values())).dequantize(), 2, 4)
