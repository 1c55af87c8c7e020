"""Issue 13 §4: one writer per output, one-line errors for unreadable models and unwritable outputs, exact
mask files, checksummed compressed files, usual file modes, and the base model's identity in provenance."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import semisparse.jobs.prune as prune_job
from semisparse import compressed, nm
from semisparse.cli import main
from semisparse.errors import SemisparseError
from semisparse.export import atomic_directory, lock_path, output_lock, provenance, save_model_dir
from semisparse.jobs.prune import prune_to_dir
from semisparse.maskfiles import save_masks
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.pruning.magnitude import MagnitudeConfig as Magnitude


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert expected in lines[0], lines[0]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Path:
    model = make_tiny_model("llama")
    prune(model, MagnitudeConfig())
    meta = provenance(base_model="tiny", method="magnitude", pattern="2:4", include=[], exclude=[])
    return save_model_dir(model, make_tiny_tokenizer(), tmp_path / "sparse", meta)


# --- 1. two writers to one output ------------------------------------------------------------------------


def test_a_second_prune_to_the_same_output_is_refused_while_the_first_runs(tmp_path, dense_dir, monkeypatch):
    """The issue's race, made deterministic: the first run holds the output's lock while it prunes."""
    out = tmp_path / "out"
    pruning, finish = threading.Event(), threading.Event()
    original = prune_job.calibrate_and_prune

    def slow(*args, **kwargs):
        if threading.current_thread().name == "first":
            pruning.set()
            assert finish.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(prune_job, "calibrate_and_prune", slow)
    results: dict[str, object] = {}

    def first() -> None:
        try:
            results["first"] = prune_to_dir(str(dense_dir), out, Magnitude(pattern="2:4"), device="cpu")
        except BaseException as err:
            results["first"] = err

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert pruning.wait(60)
        with pytest.raises(SemisparseError, match=r"being written by another semisparse run \(pid \d+\)"):
            prune_to_dir(str(dense_dir), out, Magnitude(pattern="1:4"), device="cpu")
    finally:
        finish.set()
        thread.join(60)
    assert isinstance(results["first"], dict), results["first"]
    assert json.loads((out / "semisparse.json").read_text())["pattern"] == "2:4"
    assert hidden(tmp_path) == []  # no lock file or temporary directory left


def test_cli_prune_to_an_output_another_run_holds_fails_in_one_line(tmp_path, dense_dir):
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with output_lock(out):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(60)
        code, _, stderr = run("prune", dense_dir, "-o", out, "--method", "magnitude", "--quiet")
    finally:
        release.set()
        thread.join(60)
    one_line_error(code, stderr, "is being written by another semisparse run")
    assert "choose another --output" in stderr
    assert not out.exists() and hidden(tmp_path) == []


def test_the_lock_holds_against_another_process(tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys\nfrom semisparse.errors import SemisparseError\n"
        "from semisparse.export import output_lock\n"
        "try:\n    with output_lock(sys.argv[1]):\n        sys.exit(0)\n"
        "except SemisparseError as err:\n    print(err)\n    sys.exit(3)\n"
    )
    with output_lock(out):
        assert lock_path(out).is_file()
        busy = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert busy.returncode == 3, busy.stderr
    assert f"(pid {os.getpid()})" in busy.stdout
    free = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr
    assert list(tmp_path.iterdir()) == []


def test_final_rename_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    refused = pytest.raises(SemisparseError, match="appeared while this run was writing it")
    with refused, atomic_directory(out, overwrite=False) as tmp:
        (tmp / "mine").write_text("mine")
        out.mkdir()  # another writer that does not take the lock
        (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary directory is gone


def test_overwrite_replaces_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("mine")
        out.mkdir()
        (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["mine"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_run_removes_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- 2. one-line errors instead of tracebacks -----------------------------------------------------------


def _damaged(dense_dir: Path, tmp_path: Path, kind: str) -> Path:
    model = tmp_path / kind
    model.mkdir()
    for file in dense_dir.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    weights = model / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(b"not a safetensors file" * 50)
    elif kind == "no-config":
        (model / "config.json").unlink()
    elif kind == "pickle-only":
        torch.save(load_model(str(dense_dir)).state_dict(), model / "pytorch_model.bin")
        weights.unlink()
    return model


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("truncated", "its files are damaged or incomplete"),
        ("garbage", "its files are damaged or incomplete"),
        ("no-config", "has no config.json, so it is not a model directory"),
        ("pickle-only", "holds only pickle weights (pytorch_model.bin): semisparse loads safetensors only"),
    ],
)
@pytest.mark.parametrize("command", ["prune", "info"])
def test_unloadable_model_directories_fail_in_one_line(tmp_path, dense_dir, kind, expected, command):
    model = _damaged(dense_dir, tmp_path, kind)
    out = tmp_path / "out"
    args = (
        ("prune", model, "-o", out, "--method", "magnitude", "--quiet")
        if command == "prune"
        else ("info", model)
    )
    code, _, stderr = run(*args)
    one_line_error(code, stderr, expected)
    assert not out.exists() and hidden(tmp_path) == []


def test_info_on_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, stderr = run("info", tmp_path / "empty")
    one_line_error(code, stderr, "is empty")


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  - prune: {method: magnitude}\n")
    return path


def _command(name: str, dense_dir: Path, tmp_path: Path, out: Path) -> list[object]:
    masks = tmp_path / "masks.npz"
    return {
        "prune": ["prune", dense_dir, "-o", out, "--method", "magnitude", "--quiet"],
        "quantize": ["quantize", dense_dir, "-o", out, "--method", "rtn", "--quiet"],
        "compress": ["compress", dense_dir, "-o", out],
        "decompress": ["decompress", dense_dir, "-o", out],
        "apply-mask": ["apply-mask", dense_dir, masks, "-o", out],
        "export-mask": ["export-mask", dense_dir, "-o", out / "masks.npz"],
        "eval": ["eval", dense_dir, "--ppl", tmp_path / "text.txt", "--report-dir", out, "--quiet"],
        "eval-output": ["eval", dense_dir, "--ppl", tmp_path / "text.txt", "--output", out / "rows.json"],
        "run": ["run", _recipe(tmp_path), "--model", dense_dir, "-o", out, "--quiet"],
        "train": [
            "train",
            "dense",
            dense_dir,
            "--corpus",
            tmp_path / "text.txt",
            "-o",
            out,
            "--tokens",
            "64",
            "--seq-len",
            "8",
            "--micro-batch",
            "1",
            "--grad-accum",
            "1",
        ],
        "reconstruct": ["reconstruct", dense_dir, "magnitude", "-o", out, "--quiet"],
    }[name]


COMMANDS = [
    "prune",
    "quantize",
    "compress",
    "decompress",
    "apply-mask",
    "export-mask",
    "eval",
    "eval-output",
    "run",
    "train",
    "reconstruct",
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Writability is checked first: loading any model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file_fails_first_in_one_line(tmp_path, dense_dir, command, no_model_loading):
    (tmp_path / "text.txt").write_text("some text to evaluate " * 50)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run(*_command(command, dense_dir, tmp_path, blocker / "sub"))
    one_line_error(code, stderr, f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "x" and hidden(tmp_path) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_output_in_a_read_only_directory_fails_first_in_one_line(
    tmp_path, dense_dir, command, no_model_loading, monkeypatch
):
    (tmp_path / "text.txt").write_text("some text to evaluate " * 50)
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: deny it the way access(2) would for a user
        real = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: False if Path(p) == locked and mode & os.W_OK else real(p, mode, **kw),
        )
    try:
        code, _, stderr = run(*_command(command, dense_dir, tmp_path, locked / "out"))
    finally:
        locked.chmod(0o755)
    one_line_error(code, stderr, f"directory {locked} is not writable")
    assert list(locked.iterdir()) == [] and hidden(tmp_path) == []


# --- 3. exact mask files, info's verdicts, checksums, modes, base model identity -------------------------


def _masks_with_an_empty_layer(tmp_path: Path) -> tuple[Path, str]:
    model = make_tiny_model("llama")
    masks = {}
    for name, module in find_targets(model).items():
        masks[f"{name}.weight"] = nm.nm_mask(weight_matrix(module).abs(), 2, 4)
    empty = next(iter(masks))
    masks[empty] = torch.zeros_like(masks[empty])  # keeps 0 of 4: a whole layer of zeros
    return save_masks(masks, tmp_path / "masks.npz"), empty


def test_apply_mask_needs_exactly_n_of_m_unless_at_most(tmp_path, dense_dir):
    masks, empty = _masks_with_an_empty_layer(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = run("apply-mask", dense_dir, masks, "-o", out)
    one_line_error(code, stderr, f"mask for '{empty}' in mask file {masks} keeps only 0 of 4 weights")
    assert "not exactly 2: pass --at-most" in stderr and not out.exists()

    code, output, _ = run("apply-mask", dense_dir, masks, "-o", out, "--at-most")
    assert code == 0, output
    assert json.loads((out / "semisparse.json").read_text())["settings"]["at_most"] is True

    code, output, _ = run("info", out)  # no violation, but not a plain "ok" either
    assert code == 0, output
    layer = empty.removesuffix(".weight")
    assert next(line for line in output.splitlines() if line.startswith(layer)).endswith(
        "100.00%  ok (at most 2)"
    )
    assert "0 violations, 1 at most 2" in output
    code, output, _ = run("info", out, "--json")
    report = json.loads(output)
    assert report["at_most"] == [layer] and report["violations"] == []
    assert sum(row["exact"] for row in report["layers"]) == len(report["layers"]) - 1


def test_exported_masks_are_exact_even_where_a_kept_weight_is_zero(tmp_path, sparse_dir):
    model = load_model(str(sparse_dir))
    name, module = next(iter(find_targets(model).items()))
    with torch.no_grad():
        weight_matrix(module)[0, :4] = 0  # a group that keeps none of its (zero) weights
    meta = json.loads((sparse_dir / "semisparse.json").read_text())
    zeroed = save_model_dir(model, make_tiny_tokenizer(), tmp_path / "zeroed", meta)
    code, output, _ = run("export-mask", zeroed, "-o", tmp_path / "m.npz")
    assert code == 0, output
    code, output, _ = run("apply-mask", zeroed, tmp_path / "m.npz", "-o", tmp_path / "again")
    assert code == 0, output
    again = load_model(str(tmp_path / "again"))
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    code, output, _ = run("info", zeroed)
    assert code == 0 and f"{name}" in output and "ok (at most 2)" in output


def _move_bits(path: Path, key: str, keep_checksums: bool = True) -> None:
    """Swap the kept and the dropped pair of the first group of a layer: the mask stays 2:4."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    bitmask = tensors[f"{key}.bitmask"].clone()
    low = int(bitmask[0, 0]) & 0x0F
    assert bin(low).count("1") == 2
    bitmask[0, 0] = (int(bitmask[0, 0]) & 0xF0) | (~low & 0x0F)
    tensors[f"{key}.bitmask"] = bitmask
    if not keep_checksums:
        metadata.pop("sha256")
    save_file(tensors, str(path), metadata=metadata)


def test_compressed_bitmask_with_moved_bits_is_refused(tmp_path, sparse_dir):
    out = tmp_path / "c"
    code, output, _ = run("compress", sparse_dir, "-o", out)
    assert code == 0, output
    key = next(iter(find_targets(load_model(str(sparse_dir))))) + ".weight"
    _move_bits(out / compressed.COMPRESSED_FILE, key)
    code, _, stderr = run("info", out)
    one_line_error(code, stderr, f"tensor {key}.bitmask does not match its sha256")
    # a file without checksums (written before they were added) still loads, with the check skipped
    _move_bits(out / compressed.COMPRESSED_FILE, key, keep_checksums=False)  # moves the bits back
    assert torch.equal(load_model(str(out)).state_dict()[key], load_model(str(sparse_dir)).state_dict()[key])


def test_outputs_get_the_usual_permissions(tmp_path, sparse_dir):
    old = os.umask(0o022)
    try:
        code, output, _ = run("export-mask", sparse_dir, "-o", tmp_path / "masks.npz")
        assert code == 0, output
        code, output, _ = run("compress", sparse_dir, "-o", tmp_path / "c")
        assert code == 0, output
        save_masks({}, tmp_path / "direct.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "masks.npz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "direct.npz").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "c" / compressed.COMPRESSED_FILE).stat().st_mode) == 0o644


def _listing_sha256(directory: Path) -> str:
    lines = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
        for p in sorted(directory.glob("*.safetensors"))
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def test_provenance_names_the_resolved_base_model_and_its_weights(tmp_path, dense_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output, _ = run("prune", "dense", "-o", "pruned", "--method", "magnitude", "--quiet")
    assert code == 0, output
    meta = json.loads((tmp_path / "pruned" / "semisparse.json").read_text())
    assert meta["base_model"] == "dense"
    assert meta["base_model_resolved"] == str(dense_dir.absolute())
    assert meta["base_model_sha256"] == _listing_sha256(dense_dir)

    code, output, _ = run("quantize", "pruned", "-o", "q", "--method", "rtn", "--quiet")
    assert code == 0, output
    quantized = json.loads((tmp_path / "q" / "semisparse.json").read_text())
    assert quantized["base_model_sha256"] == meta["base_model_sha256"]  # kept from the pruned source
    assert quantized["source_model"] == "pruned"
    assert quantized["source_model_resolved"] == str(tmp_path / "pruned")
    assert quantized["source_model_sha256"] == _listing_sha256(tmp_path / "pruned")

    code, output, _ = run("compress", "q", "-o", "c")
    assert code == 0, output
    packed = json.loads((tmp_path / "c" / "semisparse.json").read_text())
    assert packed["source_model_resolved"] == str(tmp_path / "q")
    assert packed["source_model_sha256"] == _listing_sha256(tmp_path / "q")
    assert packed["base_model_resolved"] == str(dense_dir.absolute())

    code, output, _ = run("quantize", "dense", "-o", "dq", "--method", "rtn", "--quiet")
    assert code == 0, output
    direct = json.loads((tmp_path / "dq" / "semisparse.json").read_text())
    assert direct["base_model_sha256"] == direct["source_model_sha256"] == _listing_sha256(dense_dir)
