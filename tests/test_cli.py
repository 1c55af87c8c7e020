"""The CLI end to end on tiny saved models: outputs load in plain transformers, bad input fails cleanly."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import ARCHS, make_tiny_model
from transformers import AutoModelForCausalLM

from semisparse import nm
from semisparse.cli import main
from semisparse.export import provenance, save_model_dir
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def prune_args(model, out, calib, *extra):
    return (
        "prune",
        model,
        "-o",
        out,
        "--calibration",
        calib,
        "--nsamples",
        4,
        "--seqlen",
        32,
        "--quiet",
        *extra,
    )


def assert_clean_failure(code, stderr, tmp_path, expected):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary output left behind"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_writes_a_plain_transformers_model_with_provenance(tmp_path, dense_dir, calib_file, method):
    out = tmp_path / "out"
    code, output, _ = run(*prune_args(dense_dir, out, calib_file, "--method", method))
    assert code == 0, output
    model = AutoModelForCausalLM.from_pretrained(out)
    targets = find_targets(model)
    assert len(targets) == 14
    for module in targets.values():
        assert nm.is_nm(weight_matrix(module), 2, 4)
        assert nm.sparsity(weight_matrix(module)) == pytest.approx(0.5)
    meta = json.loads((out / "semisparse.json").read_text())
    assert meta["method"] == method and meta["pattern"] == "2:4"
    assert set(meta["per_layer_sparsity"]) == set(targets)
    assert {"versions", "command", "seed", "prune_seconds", "peak_memory_bytes"} <= meta.keys()
    if method != "magnitude":
        assert meta["calibration"]["n_samples"] == 4 and meta["calibration"]["seqlen"] == 32
        assert next(iter(meta["calibration"]["files"].values()))  # a sha256 of the calibration data

    code, output, _ = run("info", out)
    assert code == 0 and "0 violations" in output


def test_info_flags_a_model_that_is_not_2_4(dense_dir):
    code, output, _ = run("info", dense_dir, "--pattern", "2:4")
    assert code == 1
    assert "VIOLATES" in output and "14 violations" in output


def test_eval_compares_models_on_the_same_windows(tmp_path, dense_dir, calib_file):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"evaluation sentence number {i} is here." for i in range(400)))
    out = tmp_path / "out"
    assert run(*prune_args(dense_dir, out, calib_file, "--method", "magnitude"))[0] == 0
    rows_file = tmp_path / "rows.json"
    code, output, _ = run(
        "eval",
        dense_dir,
        out,
        "--ppl",
        text,
        "--seqlen",
        64,
        "--max-windows",
        3,
        "--output",
        rows_file,
        "--quiet",
    )
    assert code == 0, output
    rows = json.loads(rows_file.read_text())
    assert [r["method"] for r in rows] == ["dense", "magnitude"]
    assert all(r["windows"] == 3 and r["seqlen"] == 64 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["perplexity"])) for r in rows)
    assert "first 3 of" in output


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_gives_the_same_logits_in_plain_transformers(tmp_path, arch):
    model = make_tiny_model(arch)
    prune(model, MagnitudeConfig(pattern="2:4"), progress=False)
    save_model_dir(model, None, tmp_path / "out", provenance(method="magnitude"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_missing_model_path(tmp_path, calib_file):
    code, _, stderr = run(*prune_args(tmp_path / "nope", tmp_path / "out", calib_file))
    assert_clean_failure(code, stderr, tmp_path, "nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern", ["5:4", "2:x", "4:4"])
def test_malformed_pattern(tmp_path, dense_dir, calib_file, pattern):
    code, _, stderr = run(*prune_args(dense_dir, tmp_path / "out", calib_file, "--pattern", pattern))
    assert_clean_failure(code, stderr, tmp_path, pattern)
    assert not (tmp_path / "out").exists()


def test_calibration_seqlen_beyond_context(tmp_path, dense_dir, calib_file):
    code, _, stderr = run(
        *prune_args(dense_dir, tmp_path / "out", calib_file, "--seqlen", 512, "--method", "wanda")
    )
    assert_clean_failure(code, stderr, tmp_path, "512")
    assert not (tmp_path / "out").exists()


def test_eval_seqlen_beyond_context(tmp_path, dense_dir, calib_file):
    code, _, stderr = run("eval", dense_dir, "--ppl", calib_file, "--seqlen", 4096)
    assert_clean_failure(code, stderr, tmp_path, "--seqlen=4096")  # the library's `seqlen`, as a flag


def test_too_small_calibration_set(tmp_path, dense_dir):
    small = tmp_path / "small.txt"
    small.write_text("too few words")
    code, _, stderr = run(*prune_args(dense_dir, tmp_path / "out", small, "--method", "sparsegpt"))
    assert_clean_failure(code, stderr, tmp_path, "too small")
    assert not (tmp_path / "out").exists()


def test_empty_calibration_file(tmp_path, dense_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, stderr = run(*prune_args(dense_dir, tmp_path / "out", empty, "--method", "wanda"))
    assert code == 2 and stderr.startswith("error:")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, dense_dir, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run(*prune_args(dense_dir, out, calib_file, "--method", "magnitude"))
    assert_clean_failure(code, stderr, tmp_path, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run(*prune_args(dense_dir, out, calib_file, "--method", "magnitude", "--overwrite"))
    assert code == 0 and (out / "semisparse.json").is_file() and not (out / "keep.txt").exists()
