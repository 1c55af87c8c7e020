"""Mask files in the public MaskLLM format: round trips, plain-numpy reading, strict checks, the CLI."""

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.maskfiles import apply_masks, load_masks, masks_from_model, save_masks, target_shapes
from semisparse.maskllm import attach_learnable_masks, detach_learnable_masks, final_masks
from semisparse.modules import find_targets
from semisparse.nm import NMPattern
from semisparse.pruning import MagnitudeConfig, prune

TWO_FOUR = NMPattern(2, 4)


def pruned_and_masks(arch):
    model = make_tiny_model(arch)
    prune(model, MagnitudeConfig(pattern="2:4"), progress=False)
    return model, masks_from_model(model, TWO_FOUR)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_then_apply_reproduces_the_sparse_model_bit_for_bit(arch, tmp_path):
    pruned, masks = pruned_and_masks(arch)
    save_masks(masks, tmp_path / "masks.npz")
    dense = make_tiny_model(arch)
    loaded = load_masks(tmp_path / "masks.npz", target_shapes(dense, TWO_FOUR))
    per_layer = apply_masks(dense, loaded, TWO_FOUR)
    assert_same_state(dense, pruned)
    assert set(per_layer) == set(find_targets(dense)) and all(v >= 0.5 for v in per_layer.values())
    assert [p.name for p in tmp_path.iterdir()] == ["masks.npz"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_learned_masks_applied_to_the_dense_model_equal_the_exported_maskllm_model(arch, tmp_path):
    learned = make_tiny_model(arch)
    attach_learnable_masks(learned, TWO_FOUR, seed=3)
    masks = final_masks(learned)
    detach_learnable_masks(learned)
    save_masks(masks, tmp_path / "m.npz")
    dense = make_tiny_model(arch)
    apply_masks(dense, load_masks(tmp_path / "m.npz", target_shapes(dense)), TWO_FOUR)
    assert_same_state(dense, learned)


def test_file_is_plain_numpy_with_param_mask_keys(tmp_path):
    pruned, masks = pruned_and_masks("llama")
    save_masks(masks, tmp_path / "masks.npz")
    with np.load(tmp_path / "masks.npz") as archive:
        assert "model.layers.0.mlp.up_proj.weight.mask" in archive.files
        assert sorted(archive.files) == sorted(f"{name}.weight.mask" for name in find_targets(pruned))
        params = dict(pruned.named_parameters())
        for key in archive.files:
            packed = archive[key]
            assert packed.dtype == np.uint8 and packed.ndim == 1
            weight = params[key.removesuffix(".mask")].detach().numpy()
            mask = np.unpackbits(packed, count=weight.size).reshape(weight.shape).astype(bool)
            assert np.array_equal(mask, weight != 0)


def test_gpt2_masks_have_the_conv1d_parameter_shape(tmp_path):
    _, masks = pruned_and_masks("gpt2")
    assert masks["transformer.h.0.mlp.c_fc.weight"].shape == (64, 128)  # Conv1D stores [in, out]
    # ... while groups of 4 run along the input dimension, i.e. down the columns of the stored weight.
    assert (masks["transformer.h.0.mlp.c_fc.weight"].t().reshape(-1, 4).sum(-1) == 2).all()


def test_save_replaces_atomically(tmp_path):
    _, masks = pruned_and_masks("llama")
    path = tmp_path / "masks.npz"
    path.write_text("old")
    save_masks(masks, path)
    assert np.load(path).files and [p.name for p in tmp_path.iterdir()] == ["masks.npz"]


def write_raw(path, arrays):
    np.savez_compressed(path, **arrays)
    return path


def packed(masks):
    return {f"{name}.mask": np.packbits(mask.numpy().reshape(-1)) for name, mask in masks.items()}


def test_unknown_and_missing_layers_are_rejected(tmp_path):
    model, masks = pruned_and_masks("llama")
    shapes = target_shapes(model, TWO_FOUR)
    extra = packed(masks) | {"model.layers.9.mlp.up_proj.weight.mask": np.zeros(4, np.uint8)}
    with pytest.raises(SemisparseError, match=r"model.layers.9.mlp.up_proj.weight' .*not a target layer"):
        load_masks(write_raw(tmp_path / "extra.npz", extra), shapes)
    partial = packed(masks)
    del partial["model.layers.1.self_attn.o_proj.weight.mask"]
    with pytest.raises(
        SemisparseError, match=r"no mask for 'model.layers.1.self_attn.o_proj.weight' .1 of 14"
    ):
        load_masks(write_raw(tmp_path / "partial.npz", partial), shapes)


def test_wrong_shapes_are_rejected(tmp_path):
    model, masks = pruned_and_masks("llama")
    arrays = packed(masks)
    arrays["model.layers.0.mlp.down_proj.weight.mask"] = arrays["model.layers.0.mlp.down_proj.weight.mask"][
        :-8
    ]
    with pytest.raises(SemisparseError, match=r"down_proj.weight' in .* has 1016 packed bytes.*needs 1024"):
        load_masks(write_raw(tmp_path / "short.npz", arrays), target_shapes(model))
    arrays["model.layers.0.mlp.down_proj.weight.mask"] = np.ones(1024, dtype=np.float32)
    with pytest.raises(SemisparseError, match=r"float32 .* not packed bits"):
        load_masks(write_raw(tmp_path / "float.npz", arrays), target_shapes(model))
    masks["model.layers.0.mlp.down_proj.weight"] = masks["model.layers.0.mlp.down_proj.weight"].t()
    with pytest.raises(
        SemisparseError, match=r"is torch.bool \(128, 64\), but the weight needs bool \(64, 128\)"
    ):
        apply_masks(make_tiny_model("llama"), masks, TWO_FOUR)


def test_masks_breaking_the_pattern_are_rejected_and_nothing_is_applied(tmp_path):
    _, masks = pruned_and_masks("llama")
    last = list(masks)[-1]
    masks[last] = torch.ones_like(masks[last])
    save_masks(masks, tmp_path / "dense.npz")
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_masks(tmp_path / "dense.npz", target_shapes(model))
    with pytest.raises(SemisparseError, match=f"mask for '{last}' .* keeps up to 4 of every 4 .*not 2:4"):
        apply_masks(model, loaded, TWO_FOUR, source="mask file dense.npz")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A mask of "N:M" keeps exactly N per group: a 2:4 mask passes as 3:4 only when at most N is asked
    # for, and never as 1:4.
    _, good = pruned_and_masks("llama")
    with pytest.raises(SemisparseError, match=r"keeps only 2 of 4 .* not exactly 3: pass `at_most`"):
        apply_masks(make_tiny_model("llama"), good, NMPattern(3, 4))
    apply_masks(make_tiny_model("llama"), good, NMPattern(3, 4), at_most=True)
    with pytest.raises(SemisparseError, match="not 1:4"):
        apply_masks(make_tiny_model("llama"), good, NMPattern(1, 4), at_most=True)


@pytest.mark.parametrize(
    "content", [b"not a zip at all", b"PK\x03\x04" + b"\x00" * 40], ids=["garbage", "truncated"]
)
def test_corrupt_files_are_rejected(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(SemisparseError, match=r"cannot read mask file .*bad.npz .*re-export it"):
        load_masks(path, target_shapes(make_tiny_model("llama")))


def test_corrupt_member_is_rejected(tmp_path):
    _, masks = pruned_and_masks("llama")
    path = save_masks(masks, tmp_path / "masks.npz")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(SemisparseError, match="cannot read mask file"):
        load_masks(path, target_shapes(make_tiny_model("llama")))


def test_foreign_entries_and_missing_files_are_rejected(tmp_path):
    shapes = target_shapes(make_tiny_model("llama"))
    with pytest.raises(SemisparseError, match=r"entry 'weights' not named '<param name>.mask'"):
        load_masks(write_raw(tmp_path / "x.npz", {"weights": np.zeros(3)}), shapes)
    with pytest.raises(SemisparseError, match="does not exist"):
        load_masks(tmp_path / "nope.npz", shapes)
    np.save(tmp_path / "single.npy", np.zeros(8, np.uint8))
    with pytest.raises(SemisparseError, match=r"holds a single array, not an \.npz archive"):
        load_masks(tmp_path / "single.npy", shapes)


def test_masks_from_a_dense_model_are_refused():
    with pytest.raises(SemisparseError, match=r"is not 2:4 sparse .*prune the model first"):
        masks_from_model(make_tiny_model("llama"), TWO_FOUR)


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path):
    dense = tmp_path / "dense"
    make_tiny_model("gpt2").save_pretrained(dense)
    make_tiny_tokenizer().save_pretrained(dense)
    pruned, masks = pruned_and_masks("gpt2")
    path = save_masks(masks, tmp_path / "masks.npz")
    return dense, path, pruned


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def assert_clean_failure(code, stderr, folder, expected):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], stderr
    assert not any(p.name.startswith(".") for p in folder.iterdir()), "temporary output left behind"


def test_cli_apply_mask_then_export_mask_round_trip(dirs, tmp_path):
    dense, masks_path, pruned = dirs
    code, out, stderr = run("apply-mask", dense, masks_path, "-o", tmp_path / "sparse")
    assert code == 0, stderr
    assert "2:4 masks on 8 layers" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert_same_state(model, pruned)
    meta = json.loads((tmp_path / "sparse" / "semisparse.json").read_text())
    assert meta["method"] == "mask-file" and meta["pattern"] == "2:4"
    assert meta["masks_sha256"] == hashlib.sha256(masks_path.read_bytes()).hexdigest()
    assert (tmp_path / "sparse" / "masks.npz").read_bytes() == masks_path.read_bytes()
    assert run("info", tmp_path / "sparse")[0] == 0

    code, out, stderr = run("export-mask", tmp_path / "sparse", "-o", tmp_path / "again.npz")
    assert code == 0, stderr
    with np.load(masks_path) as first, np.load(tmp_path / "again.npz") as second:
        assert sorted(first.files) == sorted(second.files)
        assert all(np.array_equal(first[k], second[k]) for k in first.files)
    code, _, stderr = run("export-mask", tmp_path / "sparse", "-o", tmp_path / "again.npz")
    assert_clean_failure(code, stderr, tmp_path, "already exists")
    assert run("export-mask", tmp_path / "sparse", "-o", tmp_path / "again.npz", "--overwrite")[0] == 0


def test_cli_rejects_bad_mask_files_without_leaving_output(dirs, tmp_path):
    dense, masks_path, _ = dirs
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    code, _, stderr = run("apply-mask", dense, tmp_path / "corrupt.npz", "-o", tmp_path / "out")
    assert_clean_failure(code, stderr, tmp_path, "cannot read mask file")
    code, _, stderr = run("apply-mask", dense, masks_path, "-o", tmp_path / "out", "--pattern", "1:4")
    assert_clean_failure(code, stderr, tmp_path, "not 1:4")
    code, _, stderr = run("apply-mask", dense, tmp_path / "missing.npz", "-o", tmp_path / "out")
    assert_clean_failure(code, stderr, tmp_path, "does not exist")
    code, _, stderr = run("apply-mask", dense, masks_path, "-o", tmp_path / "out", "--exclude", "*c_fc")
    assert_clean_failure(code, stderr, tmp_path, "not a target layer")
    assert not (tmp_path / "out").exists()


def test_cli_export_mask_refuses_a_dense_model(dirs, tmp_path):
    dense, _, _ = dirs
    code, _, stderr = run("export-mask", dense, "-o", tmp_path / "m.npz")
    assert_clean_failure(code, stderr, tmp_path, "is not 2:4 sparse")
    assert not (tmp_path / "m.npz").exists()
