"""Block-wise reconstruction (issue 14): pruned weights stay exactly zero, local losses go down, attn-mlp
targets are the dense sub-blocks' outputs, an interrupted run resumes bit-identically, bad inputs are one
line and write nothing, the stage composes in a recipe, and the c4-eval text is disjoint from calibration."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import semisparse.jobs.stages  # noqa: F401  (registers the stages in pipeline order, before train_stage)
from semisparse import Recipe, nm
from semisparse.cli import main
from semisparse.data import C4_CALIBRATION_DOCUMENTS, calibration_ids, evaluation_text
from semisparse.errors import SemisparseError
from semisparse.export import read_metadata
from semisparse.jobs.reconstruct import METRICS_FILE, ReconstructStage, reconstruct_to_dir, work_dir
from semisparse.jobs.train_stage import TrainStageConfig, chained_inputs
from semisparse.maskfiles import MASKS_FILE, load_masks, masks_from_model, save_masks, target_shapes
from semisparse.models import load_model, weights_sha256
from semisparse.modules import decoder_blocks, find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.pruning.engine import _calibration_mode, _capture_block_inputs
from semisparse.reconstruction import ReconstructConfig, lr_hint, reconstruct
from semisparse.reconstruction.core import Reconstructor
from semisparse.reconstruction.units import BlockState, units_of

PATTERN = nm.parse_pattern("2:4")
FAST = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "nsamples": 8, "seqlen": 32}


def ids(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 250, (n, seqlen), generator=torch.Generator().manual_seed(0))


def pruned_pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    dense, sparse = make_tiny_model(arch), make_tiny_model(arch)
    prune(sparse, MagnitudeConfig(pattern="2:4"), progress=False)
    return dense, sparse, list(find_targets(sparse))


def matrices(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: weight_matrix(model.get_submodule(name)).detach().clone() for name in names}


def invoke(*args: Any) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


# --- the mask holds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("learn_mask", [False, True], ids=["fixed-mask", "learned-mask"])
def test_pruned_weights_stay_exactly_zero_and_the_pattern_holds(arch: str, learn_mask: bool) -> None:
    dense, sparse, names = pruned_pair(arch)
    before = matrices(sparse, names)
    # What training does to the pattern (no reverting a unit that training made worse).
    config = ReconstructConfig(**FAST, learn_mask=learn_mask, mask_lr=0.05, revert_worse=False)
    reports = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
    after = matrices(sparse, names)
    assert len(reports) == 2
    for name in names:
        assert nm.is_nm(after[name], 2, 4), name
        if not learn_mask:  # every weight pruned before is still exactly zero
            assert not ((after[name] != 0) & (before[name] == 0)).any(), name
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    if learn_mask:
        changed = [report["mask_changed"] for report in reports]
        assert all(0 <= value < 0.5 for value in changed)
        assert any(value > 0 for value in changed)


@pytest.mark.parametrize("pattern", ["1:4", "4:8"])
def test_learned_masks_work_for_other_nm_patterns(pattern: str) -> None:
    parsed = nm.parse_pattern(pattern)
    dense, sparse = make_tiny_model("llama"), make_tiny_model("llama")
    prune(sparse, MagnitudeConfig(pattern=pattern), progress=False)
    names = list(find_targets(sparse))
    config = ReconstructConfig(**FAST, learn_mask=True)
    reconstruct(dense, sparse, config, ids(), names, parsed, progress=False)
    for name, matrix in matrices(sparse, names).items():
        assert nm.is_nm(matrix, parsed.n, parsed.m), name


@pytest.mark.parametrize("granularity", ["attn-mlp", "block", "linear"])
def test_reconstruction_lowers_the_local_loss_of_every_block(granularity: str) -> None:
    dense, sparse, names = pruned_pair("llama")
    config = ReconstructConfig(**{**FAST, "epochs": 4}, granularity=granularity)
    reports = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
    assert [report["block"] for report in reports] == [0, 1]
    for report in reports:
        assert report["block_loss_after"] < report["block_loss_before"]
        for unit in report["units"].values():
            assert unit["loss_after"] < unit["loss_before"], (report["block"], unit)
    expected_units = {"attn-mlp": 2, "block": 1, "linear": 7}[granularity]
    assert all(len(report["units"]) == expected_units for report in reports)
    assert lr_hint(reports, config.lr) is None


@pytest.mark.parametrize("learn_mask", [False, True], ids=["fixed-mask", "learned-mask"])
def test_a_unit_that_training_makes_worse_goes_back_to_its_start(learn_mask: bool) -> None:
    """Adam's steps are as large at a near-exact unit as anywhere: at lr 1 every unit gets worse."""
    runs = {}
    for revert in (False, True):
        dense, sparse, names = pruned_pair("llama")
        before = matrices(sparse, names)
        config = ReconstructConfig(**{**FAST, "lr": 1.0}, learn_mask=learn_mask, revert_worse=revert)
        reports = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
        runs[revert] = (reports, before, matrices(sparse, names))
    for report in runs[False][0]:
        assert all(unit["loss_after"] > unit["loss_before"] for unit in report["units"].values())
    reports, before, after = runs[True]
    for report in reports:
        assert report["block_loss_after"] == pytest.approx(report["block_loss_before"], rel=1e-6)
        for unit in report["units"].values():
            assert unit["reverted"] and unit["loss_after"] == unit["loss_before"] < unit["loss_trained"]
            assert unit.get("mask_changed", 0.0) == 0.0
    assert all(torch.equal(after[name], before[name]) for name in names)
    assert lr_hint(reports, 1.0) == (
        "note: 4 of 4 units got worse with training and kept their start: lr 1 is probably too high for "
        "this model; try --lr 0.3"
    )
    assert lr_hint(reports, 1.0, learn_mask=True) is None
    # `semisparse run` gives the same advice in the stage's summary, from the run's semisparse.json
    settings = {"granularity": "attn-mlp", "lr": 1.0, "learn_mask": learn_mask}
    metadata = {"settings": settings, "blocks": reports}
    assert ("try --lr 0.3" in ReconstructStage.summary(metadata)) is not learn_mask


def test_a_block_whose_output_got_worse_goes_back_to_its_start(monkeypatch) -> None:
    """Units can each pass their own check and the block output still drift: the block then keeps its
    start, and the next block sees the start's outputs."""

    def damaging_unit(self: Reconstructor, state: BlockState, unit: Any) -> tuple[dict[str, Any], int]:
        with torch.no_grad():
            for name in unit.layers:
                state.sparse.get_submodule(name).weight.mul_(3.0)  # same zeros, far from the dense outputs
        return {"loss_before": 1.0, "loss_after": 0.5}, 0

    monkeypatch.setattr(Reconstructor, "_unit", damaging_unit)
    runs = {}
    for revert in (False, True):
        dense, sparse, names = pruned_pair("llama")
        before = matrices(sparse, names)
        config = ReconstructConfig(**FAST, revert_worse=revert)
        runs[revert] = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
        after = matrices(sparse, names)
        assert all(torch.equal(after[name], before[name]) for name in names) == revert
    kept, damaged = runs[True], runs[False]
    assert all(report["reverted"] for report in kept)
    assert all(r["block_loss_trained"] > r["block_loss_after"] == r["block_loss_before"] for r in kept)
    assert all(report["block_loss_after"] > report["block_loss_before"] for report in damaged)
    # block 1's input is block 0's restored output: its loss before is that of a run that changes nothing
    monkeypatch.setattr(Reconstructor, "_unit", lambda self, state, unit: ({}, 0))
    dense, sparse, names = pruned_pair("llama")
    unchanged = reconstruct(dense, sparse, ReconstructConfig(**FAST), ids(), names, PATTERN, progress=False)
    assert kept[1]["block_loss_before"] == unchanged[1]["block_loss_before"]
    assert damaged[1]["block_loss_before"] != unchanged[1]["block_loss_before"]


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_bf16_autocast_trains_like_float32_and_keeps_float32_weights(arch: str) -> None:
    """bf16 matrix products (fast on CPUs with AMX) must still train every unit: one autocast context
    around all steps would reuse the first step's cached bf16 weights and make GPT-2 and OPT units worse."""
    losses = {}
    for mode in ("off", "bf16"):
        dense, sparse, names = pruned_pair(arch)
        before = matrices(sparse, names)
        config = ReconstructConfig(**{**FAST, "epochs": 4}, autocast=mode, revert_worse=False)
        reports = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
        after = matrices(sparse, names)
        for name in names:
            assert after[name].dtype == torch.float32, name
            assert nm.is_nm(after[name], 2, 4), name
            assert not ((after[name] != 0) & (before[name] == 0)).any(), name
        losses[mode] = [unit["loss_after"] for report in reports for unit in report["units"].values()]
        for report in reports:
            assert all(unit["loss_after"] < unit["loss_before"] for unit in report["units"].values())
    assert losses["bf16"] == pytest.approx(losses["off"], rel=0.1)


# --- attn-mlp targets ---------------------------------------------------------------------------------


def _block_zero(arch: str, inputs: str = "sparse") -> tuple[Reconstructor, BlockState, Any]:
    dense, sparse, names = pruned_pair(arch)
    config = ReconstructConfig(**FAST, inputs=inputs)
    runner = Reconstructor(dense, sparse, config, PATTERN, names, progress=False)
    with torch.no_grad(), _calibration_mode(sparse):
        capture = _capture_block_inputs(sparse, decoder_blocks(sparse), ids(4), 0, None)
    args, kwargs = capture.block_args[0]
    block = BlockState(0, runner.dense_blocks[0], runner.sparse_blocks[0], args, kwargs, capture.hidden)
    return runner, block, units_of(block.sparse, runner.layers[0], "attn-mlp")


def test_attn_mlp_targets_are_the_dense_sub_block_outputs_llama() -> None:
    runner, state, (attn, mlp) = _block_zero("llama")
    dense, sparse, x, kwargs = state.dense, state.sparse, state.hidden, state.kwargs
    with torch.no_grad():
        got = runner.collect(state, attn)
        want_in = sparse.input_layernorm(x)
        want = dense.self_attn(hidden_states=dense.input_layernorm(x), **kwargs)[0]
        torch.testing.assert_close(got.inputs, want_in, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.targets, want, rtol=0, atol=1e-6)
        # the MLP's input comes from the (sparse, reconstructed) attention, its target from the dense MLP
        got = runner.collect(state, mlp)
        h = x + sparse.self_attn(hidden_states=sparse.input_layernorm(x), **kwargs)[0]
        torch.testing.assert_close(got.inputs, sparse.post_attention_layernorm(h), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            got.targets, dense.mlp(dense.post_attention_layernorm(h)), rtol=0, atol=1e-6
        )
        assert not torch.allclose(got.targets, sparse.mlp(sparse.post_attention_layernorm(h)))


def test_attn_mlp_targets_are_the_dense_sub_block_outputs_gpt2_and_opt() -> None:
    runner, state, (attn, mlp) = _block_zero("gpt2")
    dense, sparse, x = state.dense, state.sparse, state.hidden
    with torch.no_grad():
        torch.testing.assert_close(
            runner.collect(state, attn).targets, dense.attn(dense.ln_1(x))[0], rtol=0, atol=1e-6
        )
        h = x + sparse.attn(sparse.ln_1(x))[0]
        got = runner.collect(state, mlp)
        torch.testing.assert_close(got.targets, dense.mlp(dense.ln_2(h)), rtol=0, atol=1e-6)

    runner, state, (attn, mlp) = _block_zero("opt")
    dense, sparse, x = state.dense, state.sparse, state.hidden
    assert (mlp.sub.entry, mlp.sub.exit) == ("fc1", "fc2")  # OPT's MLP lives in the layer itself
    with torch.no_grad():
        attention = dense.self_attn(hidden_states=dense.self_attn_layer_norm(x), **state.kwargs)[0]
        torch.testing.assert_close(runner.collect(state, attn).targets, attention, rtol=0, atol=1e-6)
        h = x + sparse.self_attn(hidden_states=sparse.self_attn_layer_norm(x), **state.kwargs)[0]
        want = dense.fc2(dense.activation_fn(dense.fc1(dense.final_layer_norm(h))))
        torch.testing.assert_close(runner.collect(state, mlp).targets, want, rtol=0, atol=1e-6)


def test_gemma_sub_blocks_end_before_their_output_norms() -> None:
    """Gemma adds norm(attention) and norm(MLP) to the residual; the targets stay the raw outputs (matching
    after those norms made Gemma-3-270M 2.5x worse: reconstruct_gemma3_cpu_16x2048_bf16_postnorm.md)."""
    runner, state, (attn, mlp) = _block_zero("gemma3")
    dense, sparse, x, kwargs = state.dense, state.sparse, state.hidden, state.kwargs
    with torch.no_grad():
        got = runner.collect(state, attn)
        want = dense.self_attn(hidden_states=dense.input_layernorm(x), **kwargs)[0]
        torch.testing.assert_close(got.targets, want, rtol=0, atol=1e-6)
        h = x + sparse.post_attention_layernorm(
            sparse.self_attn(hidden_states=sparse.input_layernorm(x), **kwargs)[0]
        )
        got = runner.collect(state, mlp)
        torch.testing.assert_close(got.inputs, sparse.pre_feedforward_layernorm(h), rtol=0, atol=1e-6)
        want = dense.mlp(dense.pre_feedforward_layernorm(h))
        torch.testing.assert_close(got.targets, want, rtol=0, atol=1e-6)


def test_dense_inputs_take_the_dense_attention_output_for_the_mlp() -> None:
    runner, state, (_, mlp) = _block_zero("llama", inputs="dense")
    dense, sparse, x, kwargs = state.dense, state.sparse, state.hidden, state.kwargs
    with torch.no_grad():
        h = x + dense.self_attn(hidden_states=dense.input_layernorm(x), **kwargs)[0]
        got = runner.collect(state, mlp)
        torch.testing.assert_close(got.inputs, sparse.post_attention_layernorm(h), rtol=0, atol=1e-6)


# --- the job: outputs, resume, errors --------------------------------------------------------------------


def _config(calib_file: Path, **extra: Any) -> ReconstructConfig:
    return ReconstructConfig(**{**FAST, "source": str(calib_file), "device": "cpu", **extra})


def test_output_is_a_pruned_model_directory_with_provenance(tmp_path, dense_dir, calib_file) -> None:
    out = tmp_path / "out"
    meta = reconstruct_to_dir(str(dense_dir), "wanda", out, _config(calib_file), progress=False)
    model = load_model(str(out))
    saved = read_metadata(out)
    assert (
        saved["method"] == "reconstruct" and saved["pattern"] == "2:4" and meta["start"]["method"] == "wanda"
    )
    assert saved["calibration"]["n_samples"] == 8 and len(saved["blocks"]) == 2
    assert saved["block_loss_after"] < saved["block_loss_before"]
    assert {"seconds", "units", "block_loss_before"} <= set(saved["blocks"][0])
    assert saved["peak_memory_bytes"]["process_rss"] > 0
    assert saved["base_model_sha256"] == weights_sha256(dense_dir)
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [line["block"] for line in lines] == [0, 1]
    masks = load_masks(out / MASKS_FILE, target_shapes(model, PATTERN))  # a MaskLLM prior_mask
    assert masks.keys() == masks_from_model(model, PATTERN).keys()
    assert not work_dir(out).exists()
    for module in find_targets(model).values():
        assert nm.is_nm(weight_matrix(module), 2, 4)


def test_a_mask_file_start_keeps_its_mask(tmp_path, dense_dir, calib_file) -> None:
    pruned = make_tiny_model("llama")
    prune(pruned, MagnitudeConfig(pattern="2:4"), progress=False)
    masks = masks_from_model(pruned, PATTERN)
    path = save_masks(masks, tmp_path / "masks.npz")
    out = tmp_path / "out"
    reconstruct_to_dir(str(dense_dir), str(path), out, _config(calib_file), progress=False)
    model = load_model(str(out))
    for name, module in find_targets(model).items():
        assert not ((module.weight != 0) & ~masks[f"{name}.weight"]).any()


@pytest.mark.parametrize(
    "settings",
    [{}, {"learn_mask": True}, {"inputs": "dense", "granularity": "linear"}, {"autocast": "bf16"}],
    ids=["fixed-mask", "learned-mask", "dense-inputs-linear", "bf16"],
)
def test_an_interrupted_run_resumes_bit_identically(tmp_path, dense_dir, calib_file, settings) -> None:
    config = _config(calib_file, **settings)
    full = tmp_path / "full"
    reconstruct_to_dir(str(dense_dir), "sparsegpt", full, config, progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(index: int, report: dict[str, Any]) -> None:
        raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        reconstruct_to_dir(
            str(dense_dir), "sparsegpt", out, config, progress=False, after_block=stop_after_first
        )
    assert not out.exists() and (work_dir(out) / "block-0000.safetensors").is_file()
    with pytest.raises(SemisparseError, match="pass `resume` to continue it"):
        reconstruct_to_dir(str(dense_dir), "sparsegpt", out, config, progress=False)
    with pytest.raises(SemisparseError, match="other inputs or settings"):
        reconstruct_to_dir(str(dense_dir), "sparsegpt", out, _config(calib_file, lr=2e-3), resume=True)
    meta = reconstruct_to_dir(str(dense_dir), "sparsegpt", out, config, resume=True, progress=False)
    assert meta["resumed_at_block"] == 1 and len(meta["blocks"]) == 2
    want, got = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[key], got[key]) for key in want)
    assert (out / METRICS_FILE).read_text().count("\n") == 2
    # resuming a finished run changes nothing
    assert (
        reconstruct_to_dir(str(dense_dir), "sparsegpt", out, config, resume=True)["created"]
        == meta["created"]
    )


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, dense_dir, calib_file) -> None:
    wider = LlamaForCausalLM(
        LlamaConfig(**{**make_tiny_model("llama").config.to_dict(), "intermediate_size": 256})
    )
    prune(wider, MagnitudeConfig(pattern="2:4"), progress=False)
    gpt2 = make_tiny_model("gpt2")
    prune(gpt2, MagnitudeConfig(pattern="2:4"), progress=False)
    four_eight = make_tiny_model("llama")
    prune(four_eight, MagnitudeConfig(pattern="4:8"), progress=False)
    (_save(four_eight, tmp_path / "48") / "semisparse.json").write_text('{"pattern": "4:8"}')
    cases = {
        "shapes": (_save(wider, tmp_path / "wider"), [], "has shape (256, 64)"),
        "not sparse": (dense_dir, [], "is not 2:4 sparse"),
        "pattern": (tmp_path / "48", ["--pattern", "2:4"], "pruned to 4:8, not 2:4"),
        "masks": (
            save_masks(masks_from_model(gpt2, PATTERN), tmp_path / "gpt2.npz"),
            [],
            "not a target layer of this model",
        ),
        "granularity": (
            "magnitude",
            ["--granularity", "sub-block"],
            "--granularity='sub-block' must be one of",
        ),
        "unknown": ("sparsegtp", [], "neither a pruned model directory"),
        "setting": ("magnitude", ["--set", "tau=1"], "unknown reconstruct setting(s) tau"),
    }
    common = ["--calibration", calib_file, "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "--quiet"]
    for case, (pruned, extra, message) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        code, stderr = invoke("reconstruct", dense_dir, pruned, "-o", out, *common, *extra)
        assert code == 2, (case, stderr)
        assert message in stderr and stderr.count("\n") == 1, (case, stderr)
        assert not out.exists() and not work_dir(out).exists(), case


def test_config_rejects_unknown_names_in_one_line() -> None:
    with pytest.raises(SemisparseError, match="`granularity`='layer' must be one of attn-mlp, block, linear"):
        ReconstructConfig(granularity="layer")
    with pytest.raises(SemisparseError, match="`inputs`='teacher' must be one of sparse, dense"):
        ReconstructConfig.from_mapping({"inputs": "teacher"})
    assert ReconstructConfig.from_mapping(None) == ReconstructConfig()


def test_cli_reconstructs_and_reports(tmp_path, dense_dir, calib_file) -> None:
    out = tmp_path / "out"
    args = ["--calibration", calib_file, "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in ("reconstruct", dense_dir, "magnitude", "-o", out, *args, "--learn-mask", "--epochs", 1)
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "attn-mlp reconstruction of magnitude 2:4, 2 blocks" in result.output
        and "mask changed" in result.output
    )
    assert read_metadata(out)["settings"]["learn_mask"] is True
    code, stderr = invoke("reconstruct", dense_dir, "magnitude", "-o", out, *args)
    assert code == 2 and "choose another --output or pass --overwrite" in stderr


# --- composition ---------------------------------------------------------------------------------------


def test_the_stage_runs_in_a_recipe_after_prune_and_composes(tmp_path, dense_dir, calib_file) -> None:
    calibration = {"source": str(calib_file), "nsamples": 4, "seqlen": 32}
    recipe = Recipe.from_mapping(
        {
            "stages": [
                {"prune": {"method": "sparsegpt", "pattern": "2:4", **calibration}},
                {"reconstruct": {**calibration, "epochs": 1, "granularity": "block", "device": "cpu"}},
                {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, **calibration}},
                {"compress": None},
                {"eval": {"dataset": str(calib_file), "seqlen": 32, "max_windows": 2}},
            ]
        }
    )
    result = recipe.run(str(dense_dir), out=tmp_path / "out", progress=False)
    chain = result.provenance["stages"]
    assert [record["name"] for record in chain] == ["prune", "reconstruct", "quantize", "compress", "eval"]
    assert chain[1]["input"] == "01-prune" and "block output loss" in chain[1]["summary"]
    reconstructed = tmp_path / "out" / "02-reconstruct"
    meta = read_metadata(reconstructed)
    assert meta["start"]["method"] == "sparsegpt" and meta["pattern"] == "2:4"
    # a valid AST init and MaskLLM prior: the train stage chains it like a pruned model
    ast = TrainStageConfig.from_mapping({"method": "ast"})
    assert chained_inputs(ast, str(reconstructed), tmp_path / "t", str(dense_dir)) == (
        str(dense_dir),
        {"init": str(reconstructed)},
    )
    maskllm = TrainStageConfig.from_mapping({"method": "maskllm"})
    model, derived = chained_inputs(maskllm, str(reconstructed), tmp_path / "m", str(dense_dir))
    assert load_masks(derived["prior_mask"], target_shapes(load_model(model), PATTERN))
    with pytest.raises(SemisparseError, match="needs a pruned model"):
        Recipe.from_mapping({"stages": [{"reconstruct": calibration}]}).run(
            str(dense_dir), out=tmp_path / "alone", progress=False
        )


# --- the c4-eval protocol ------------------------------------------------------------------------------

C4_FILE = "allenai/c4/en/c4-train.00000-of-01024.first1000.jsonl"


@pytest.fixture
def c4_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    docs = [f"document {i} says the sparse model keeps two of four weights." for i in range(1000)]
    path = tmp_path / "mirror" / C4_FILE
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path / "mirror"))
    return path, docs


def _stream(docs: list[str]) -> list[int]:
    tokenizer = make_tiny_tokenizer()
    return [
        t
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]
        for t in [*ids, tokenizer.eos_token_id]
    ]


def test_c4_eval_text_is_disjoint_from_what_calibration_reads(c4_mirror, tmp_path, dense_dir) -> None:
    _, docs = c4_mirror
    text, source = evaluation_text("c4-eval")
    assert text == "\n\n".join(docs[C4_CALIBRATION_DOCUMENTS:])
    assert source["sha256"] == hashlib.sha256(text.encode()).hexdigest() and source["dataset"] == "c4-eval"
    # a budget larger than the shard: calibration still stops at document 900
    _, info = calibration_ids(make_tiny_tokenizer(), "c4", n_samples=64, seqlen=128)
    assert info["documents"] == C4_CALIBRATION_DOCUMENTS
    assert info["stream_tokens"] == len(_stream(docs[:C4_CALIBRATION_DOCUMENTS]))
    code, stderr = invoke(
        "eval", dense_dir, "--ppl", "c4-eval", "--seqlen", 32, "--max-windows", 1, "--device", "cpu"
    )
    assert code == 0, stderr


def test_the_real_c4_shard_splits_into_calibration_and_evaluation() -> None:
    from semisparse.data import _iter_texts, mirror_file

    shard = mirror_file("allenai/c4", "en", "c4-train.00000-of-01024.first1000")
    if shard is None:
        pytest.skip("no data mirror")
    texts = list(_iter_texts(shard))
    text, source = evaluation_text("c4-eval")
    assert len(texts) == 1000 and text == "\n\n".join(texts[900:])
    assert not set(texts[:900]) & set(texts[900:])
    assert source["documents"] == "900-999 (0-based)"


def test_the_example_recipe_validates() -> None:
    recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "sparsegpt-reconstruct.yaml")
    assert [stage.name for stage in recipe.stages] == ["prune", "reconstruct", "eval", "eval"]


def test_mask_layers_limits_mask_learning_to_the_matching_layers() -> None:
    dense, sparse, names = pruned_pair("llama")
    before = matrices(sparse, names)
    config = ReconstructConfig(
        **FAST, learn_mask=True, mask_lr=0.05, revert_worse=False, mask_layers=["mlp.*"]
    )
    reports = reconstruct(dense, sparse, config, ids(), names, PATTERN, progress=False)
    after = matrices(sparse, names)
    moved = {name for name in names if ((after[name] != 0) & (before[name] == 0)).any()}
    assert moved and all(".mlp." in name for name in moved)  # attention kept its masks exactly
    for report in reports:
        assert report["units"]["attn"]["mask_changed"] == 0.0
        assert "loss_joint" not in report["units"]["attn"] and "loss_joint" in report["units"]["mlp"]


def test_mask_layers_matching_no_layer_is_refused_before_any_work() -> None:
    dense, sparse, names = pruned_pair("llama")
    config = ReconstructConfig(**FAST, learn_mask=True, mask_layers=["mpl.*"])
    with pytest.raises(SemisparseError, match=r"`mask_layers` \['mpl.\*'\] matches no target layer.*mlp"):
        Reconstructor(dense, sparse, config, PATTERN, names, progress=False)
