"""Recipes: the example recipes run end to end on a tiny model, an interrupted recipe resumes at the next
stage, bad recipes fail in one line before anything is written, and OUT/semisparse.json chains the stages."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import isolated_cache, write_corpus, write_eval_text  # noqa: F401

from semisparse import Recipe, nm, registry
from semisparse.cli import main
from semisparse.compressed import is_compressed_dir
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.jobs.base import StageConfig
from semisparse.methods.dense import DenseMethod
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.training.loop import TrainingInterrupted

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def invoke(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


@pytest.fixture
def small(tmp_path: Path, calib_file: Path) -> dict[str, str]:
    """Local data that replaces the recipes' C4 / Wikipedia / WikiText-2 at tiny sizes."""
    return {
        "calib": str(calib_file),
        "corpus": str(write_corpus(tmp_path / "corpus.jsonl")),
        "eval": str(write_eval_text(tmp_path / "eval.txt")),
    }


def shrink(mapping: dict[str, Any], small: dict[str, str]) -> dict[str, Any]:
    """The recipe with calibration, token budgets and evaluation cut to a tiny model; same stage list."""
    for item in mapping["stages"]:
        ((name, values),) = item.items()
        values = dict(values or {})
        if name in ("prune", "quantize", "reconstruct"):
            values.update(source=small["calib"], nsamples=4, seqlen=32)
        if name == "reconstruct":
            values.update(epochs=1, device="cpu")
        if name == "quantize":
            values["group_size"] = 32  # the tiny model's layers have 64 or 128 inputs
        if name == "train":
            values.update(corpus=small["corpus"], tokens=256, seq_len=32, micro_batch=2, eval_every=0)
            values.update(eval_windows=2, eval_seqlen=32, eval_corpus=small["eval"], checkpoint_every=0)
        if name == "eval":
            values.update(dataset=small["eval"], seqlen=32, max_windows=2)
        item[name] = values
    return mapping


def example(name: str, small: dict[str, str]) -> dict[str, Any]:
    return shrink(yaml.safe_load((RECIPES / name).read_text()), small)


def chain_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "semisparse.json").read_text())


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(str(model_dir)).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


# --- the example recipes ---------------------------------------------------------------------------------


def test_sparsegpt_gptq_compress_example_through_the_cli(tmp_path, dense_dir, small):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(example("sparsegpt-gptq-compress.yaml", small)))
    out = tmp_path / "out"
    code, output, stderr = invoke("run", recipe, "-o", out, "--model", dense_dir, "--quiet")
    assert code == 0, stderr
    lines = output.strip().splitlines()
    assert len(lines) == 1
    assert all(folder in lines[0] for folder in ("01-prune", "02-quantize", "03-compress", "04-eval"))
    assert f"final model {out / '03-compress'}" in lines[0]
    assert is_compressed_dir(out / "03-compress")
    model = load_model(str(out / "03-compress"))
    assert all(nm.is_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values())
    results = json.loads((out / "04-eval" / "results.json").read_text())
    assert results["table"][0]["model"] == str(out / "03-compress") and results["table"][0]["perplexity"] > 1
    meta = json.loads((out / "02-quantize" / "semisparse.json").read_text())
    assert meta["method"] == "sparsegpt+gptq-int4" and meta["quantization"]["group_size"] == 32

    chain = chain_of(out)
    assert [s["name"] for s in chain["stages"]] == ["prune", "quantize", "compress", "eval"]
    assert [s["input"] for s in chain["stages"]] == [str(dense_dir), "01-prune", "02-quantize", "03-compress"]
    assert [s["model"] for s in chain["stages"]] == ["01-prune", "02-quantize", "03-compress", None]
    assert chain["final_model"] == "03-compress" and chain["base_model"] == str(dense_dir)
    assert all(s["status"] == "finished" and s["seconds"] >= 0 for s in chain["stages"])
    calib = small["calib"]
    prune, quantize, _, evaluation = chain["stages"]
    assert prune["config"]["method"] == "sparsegpt" and prune["config"]["blocksize"] == 128
    assert prune["config"]["nsamples"] == 4
    assert prune["data"][str(Path(calib).resolve())] == file_sha256(calib)  # calibration file and hash
    assert quantize["config"]["bits"] == 4 and quantize["data"] == prune["data"]
    assert evaluation["data"] == {small["eval"]: file_sha256(small["eval"])}
    assert {"python", "torch", "transformers", "semisparse"} <= chain["versions"].keys()
    assert prune["metadata"] == "01-prune/semisparse.json" and "sparsegpt 2:4" in prune["summary"]

    # OUT/recipe.yaml is the resolved recipe: it loads back to the same stages, model filled in.
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["model"] == str(dense_dir)
    again = Recipe.from_yaml(out / "recipe.yaml")
    assert again.to_dict() == resolved
    assert [stage.to_dict() for stage in again.stages] == resolved["stages"]


def test_magnitude_ast_example_trains_from_the_pruned_model(tmp_path, dense_dir, small):
    recipe = Recipe.from_mapping(example("magnitude-ast.yaml", small))
    result = recipe.run(str(dense_dir), out=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result.final_model == str(out / "02-train" / "model")
    assert result.ran == ["01-prune", "02-train", "03-eval"]
    model = load_model(result.final_model)
    assert all(nm.is_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values())

    train = chain_of(out)["stages"][1]
    assert train["config"]["mask_update_every"] == 0 and train["config"]["decay_lambda"] == 0
    assert train["config"]["tokens"] == 256 and "init" not in train["config"]  # init comes from the chain
    # AST starts from the pruned model of stage 1; the dense base model stays the student's source/teacher.
    assert train["chained"]["init"] == str(out / "01-prune") and train["chained"]["model"] == str(dense_dir)
    assert train["model"] == "02-train/model" and "4 steps, 256 tokens" in train["summary"]
    meta = json.loads((out / "02-train" / "model" / "semisparse.json").read_text())
    assert meta["method"] == "ast" and meta["training"]["config"]["method"]["init"] == str(out / "01-prune")
    results = json.loads((out / "03-eval" / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [str(dense_dir), result.final_model]  # baseline


def test_reconstruct_ast_example_trains_ast_from_the_reconstructed_model(tmp_path, dense_dir, small):
    recipe = Recipe.from_mapping(example("sparsegpt-reconstruct-ast.yaml", small))
    result = recipe.run(str(dense_dir), out=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result.ran == ["01-prune", "02-reconstruct", "03-train", "04-eval", "05-eval", "06-eval"]
    assert result.final_model == str(out / "03-train" / "model")
    model = load_model(result.final_model)
    assert all(nm.is_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values())

    stages = chain_of(out)["stages"]
    assert stages[1]["input"] == "01-prune" and stages[1]["config"]["autocast"] == "bf16"
    train = stages[2]
    # AST starts from the reconstruction, not from the one-shot prune; the teacher stays the dense model.
    assert train["chained"]["init"] == str(out / "02-reconstruct")
    assert train["chained"]["model"] == str(dense_dir)
    assert train["config"]["gradient_checkpointing"] is True and train["config"]["mask_update_every"] == 0
    for folder in ("04-eval", "05-eval", "06-eval"):
        table = json.loads((out / folder / "results.json").read_text())["table"]
        assert [row["model"] for row in table] == [result.final_model] and table[0]["perplexity"] > 1


@pytest.mark.parametrize("name", sorted(path.name for path in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates(name: str) -> None:
    recipe = Recipe.from_yaml(RECIPES / name)
    assert recipe.model == "smollm2-135m" and recipe.stages


def test_maskllm_after_pruning_learns_on_the_dense_model_with_the_pruned_prior(tmp_path, dense_dir, small):
    stages = [{"prune": {"method": "magnitude"}}, {"train": {"method": "maskllm", "tau_start": 2}}]
    mapping = shrink({"stages": stages}, small)
    result = Recipe.from_mapping(mapping).run(str(dense_dir), out=tmp_path / "out", progress=False)
    chained = result.provenance["stages"][1]["chained"]
    prior = tmp_path / "out" / "02-train-prior-masks.npz"
    assert chained == {"model": str(dense_dir), "prior_mask": str(prior), "resumed_from_checkpoint": False}
    assert prior.is_file()
    meta = json.loads((Path(result.final_model) / "semisparse.json").read_text())
    assert meta["method"] == "maskllm"


def test_python_api_from_yaml_with_the_model_in_the_recipe(tmp_path, dense_dir, small):
    recipe_file = tmp_path / "short.yaml"
    evaluation = f"dataset: {small['eval']}, seqlen: 32, max_windows: 2"
    recipe_file.write_text(
        f"model: {dense_dir}\nstages:\n  - eval: {{{evaluation}}}\n  - prune: {{method: magnitude}}\n"
        f"  - eval: {{{evaluation}, baseline: true}}\n"
    )
    recipe = Recipe.from_yaml(recipe_file)
    assert [stage.name for stage in recipe.stages] == ["eval", "prune", "eval"]
    assert recipe.model == str(dense_dir)
    result = recipe.run(out=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert result.out == out and result.final_model == str(out / "02-prune")
    assert result.ran == ["01-eval", "02-prune", "03-eval"] and result.skipped == []
    assert [s["input"] for s in result.provenance["stages"]] == [str(dense_dir), str(dense_dir), "02-prune"]
    assert result.provenance["stages"][0]["results"] == "01-eval/results.json"
    assert result.provenance == chain_of(out)
    first = json.loads((out / "01-eval" / "results.json").read_text())["table"]
    last = json.loads((out / "03-eval" / "results.json").read_text())["table"]
    assert [row["model"] for row in last] == [str(dense_dir), str(out / "02-prune")]
    assert last[0]["perplexity"] == first[0]["perplexity"] and last[1]["method"] == "magnitude"
    line = result.summary()
    assert line.startswith(f"ran {out}: 01-eval: perplexity ")
    assert "02-prune: magnitude 2:4, 50.00% zeros" in line
    with pytest.raises(SemisparseError, match="contradict"):
        recipe.run(out=out, resume=True, overwrite=True)


# --- resuming ---------------------------------------------------------------------------------------------


def test_interrupted_recipe_resumes_at_the_next_stage(tmp_path, dense_dir, small, monkeypatch):
    mapping = example("sparsegpt-gptq-compress.yaml", small)
    recipe = Recipe.from_mapping(mapping)
    full = recipe.run(str(dense_dir), out=tmp_path / "full", progress=False)

    out = tmp_path / "out"
    import semisparse.jobs.stages as stages

    def boom(*args: Any, **kwargs: Any) -> None:
        raise SemisparseError("out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(stages, "quantize_to_dir", boom)
        with pytest.raises(SemisparseError, match="simulated"):
            recipe.run(str(dense_dir), out=out, progress=False)
    chain = chain_of(out)
    statuses = [(s["name"], s["status"]) for s in chain["stages"]]
    assert statuses == [("prune", "finished"), ("quantize", "failed")]
    assert "simulated" in chain["stages"][1]["error"] and chain["final_model"] is None
    assert not (out / "02-quantize").exists()
    pruned = out / "01-prune" / "model.safetensors"
    stamp = pruned.stat().st_mtime_ns

    # Without --resume an existing OUT is refused, and nothing changes.
    code, _, stderr = invoke("run", RECIPES / "sparsegpt-gptq-compress.yaml", "-o", out, "--model", dense_dir)
    assert code == 2 and stderr.count("\n") == 1 and "--resume" in stderr and "--overwrite" in stderr

    calls = []
    original = stages.prune_to_dir
    monkeypatch.setattr(stages, "prune_to_dir", lambda *a, **k: calls.append(a) or original(*a, **k))
    result = recipe.run(str(dense_dir), out=out, resume=True, progress=False)
    assert calls == [] and pruned.stat().st_mtime_ns == stamp  # stage 1 was not rerun
    assert result.skipped == ["01-prune"] and result.ran == ["02-quantize", "03-compress", "04-eval"]
    assert_same_weights(out / "03-compress", tmp_path / "full" / "03-compress")
    assert chain_of(out)["final_model"] == "03-compress"
    assert [s["status"] for s in chain_of(out)["stages"]] == ["finished"] * 4
    assert chain_of(out)["created"] == chain["created"]
    ours = json.loads((out / "04-eval" / "results.json").read_text())["table"][0]["perplexity"]
    theirs = json.loads((Path(full.out) / "04-eval" / "results.json").read_text())["table"][0]["perplexity"]
    assert ours == theirs

    # Resuming a finished run does nothing; a changed config of a finished stage is a one-line error.
    again = recipe.run(str(dense_dir), out=out, resume=True, progress=False)
    assert again.ran == [] and again.final_model == str(out / "03-compress")
    mapping["stages"][0]["prune"]["blocksize"] = 64
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(mapping))
    code, _, stderr = invoke("run", changed, "-o", out, "--model", dense_dir, "--resume")
    assert code == 2 and stderr.count("\n") == 1
    assert "stage 1 (prune)" in stderr and "blocksize: 128 -> 64" in stderr and "--overwrite" in stderr
    code, _, stderr = invoke("run", changed, "-o", out, "--model", tmp_path / "nope", "--resume")
    assert code == 2 and "does not exist" in stderr
    # --overwrite starts over.
    code, _, stderr = invoke("run", changed, "-o", out, "--model", dense_dir, "--overwrite", "--quiet")
    assert code == 0, stderr
    assert chain_of(out)["stages"][0]["config"]["blocksize"] == 64


def test_interrupted_train_stage_resumes_from_its_checkpoint(tmp_path, dense_dir, small, monkeypatch):
    train = {"method": "dense", "checkpoint_every": 2}
    mapping = shrink({"stages": [{"train": train}, {"eval": {}}]}, small)
    mapping["stages"][0]["train"]["checkpoint_every"] = 2
    recipe = Recipe.from_mapping(mapping)
    recipe.run(str(dense_dir), out=tmp_path / "full", progress=False)

    def stop_after_3(self, step):
        if step + 1 == 3:
            signal.raise_signal(signal.SIGINT)
        return {}

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(DenseMethod, "after_step", stop_after_3)
        with pytest.raises(TrainingInterrupted):
            recipe.run(str(dense_dir), out=out, progress=False)
    assert chain_of(out)["stages"][0]["status"] == "failed"
    assert (out / "01-train" / "checkpoints").is_dir() and not (out / "01-train" / "model").exists()
    result = recipe.run(str(dense_dir), out=out, resume=True, progress=False)
    assert result.provenance["stages"][0]["chained"]["resumed_from_checkpoint"] is True
    expected = load_file(tmp_path / "full" / "01-train" / "model" / "model.safetensors")
    resumed = load_file(out / "01-train" / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())


# --- mistakes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stages:\n  - prunee: {}\n", "unknown stage 'prunee': use one of prune, train, quantize, compress"),
        ("stages:\n  - prune: {method: sparsegpt, blocksz: 64}\n", "unknown prune stage setting(s) blocksz"),
        ("stages:\n  - prune: {nsamples: many}\n", "setting `nsamples`='many' must be a number"),
        ("stages:\n  - quantize: {bits: 3}\n", "gptq setting `bits`=3 must be one of 4, 8"),
        ("stages:\n  - train: {method: ast, tokens: 1M, lr: -1}\n", "`lr`=-1.0 must be > 0"),
        ("stages:\n  - train: {method: ast, nonsense: 1}\n", "unknown train stage setting(s) nonsense"),
        ("stages:\n  - eval: {tasks: [nope]}\n", "unknown task 'nope'"),
        ("stages:\n  prune: {}\n", "`stages` in recipe"),
        ("- prune: {}\n", "must be a mapping with `stages`"),
        ("stages: []\n", "non-empty list"),
        ("stages:\n  - {prune: {}, eval: {}}\n", "stage 1 of recipe"),
        ("modle: x\nstages:\n  - compress:\n", "unknown key(s) modle"),
        ("stages:\n  - prune: [1, 2]\n", "must be a mapping of name: value, got list"),
        ("stages: [prune: {method: x}\n", "is not valid YAML at line"),
    ],
)
def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, dense_dir, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code, _, stderr = invoke("run", recipe, "-o", out, "--model", dense_dir)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr
    assert not out.exists()
    with pytest.raises(SemisparseError):
        Recipe.from_yaml(recipe)


def test_unknown_key_names_the_valid_ones_of_the_technique():
    with pytest.raises(SemisparseError) as err:
        Recipe.from_mapping({"stages": [{"prune": {"method": "sparsegpt", "blocksz": 64}}]})
    message = str(err.value)
    assert message.startswith("stage 1 of the recipe (prune): unknown prune stage setting(s) blocksz; valid:")
    assert "nsamples" in message and "sparsegpt's pattern, sparsity, blocksize, percdamp" in message


def test_train_stage_splits_training_and_trainer_settings():
    stage = registry.lookup("stage", "train").config
    flat = {"method": "ast", "tokens": "1M", "lr": "1e-4", "mask_update_every": "0"}
    config = stage.from_mapping({**flat, "method_settings": {"slorb": "yes"}})
    assert config.training == {"tokens": 1_000_000, "lr": 1e-4}
    assert config.settings == {
        "mask_update_every": 0,
        "slorb": True,
    }  # slorb_init stays AST's run-time choice
    assert config.to_dict() == {"method": "ast", **config.training, **config.settings}
    with pytest.raises(SemisparseError, match=r"setting\(s\) method_settings.lr; valid: method, corpus"):
        stage.from_mapping({"method": "dense", "method_settings": {"lr": 1}})
    with pytest.raises(SemisparseError, match="unknown trainer 'sgd'"):
        stage.from_mapping({"method": "sgd"})
    with pytest.raises(SemisparseError, match="smaller than one optimizer step"):
        stage.from_mapping({"method": "dense", "tokens": 10})


def test_a_missing_output_or_model_path_fails_before_writing(tmp_path, small):
    recipe = Recipe.from_mapping({"model": str(tmp_path / "missing"), "stages": ["compress"]})
    with pytest.raises(SemisparseError, match="does not exist"):
        recipe.run(out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(SemisparseError, match="not the output of a recipe"):
        recipe.run(str(tmp_path), out=other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


# --- the registry and the one-stage commands ---------------------------------------------------------


def test_stages_are_registered_with_typed_configs():
    assert registry.names("stage")[:5] == ["prune", "train", "quantize", "compress", "eval"]
    for name in registry.names("stage"):
        entry = registry.lookup("stage", name)
        assert issubclass(entry.config, StageConfig) and entry.summary
    assert not registry.lookup("stage", "eval").implementation.produces_model
    config = registry.lookup("stage", "prune").config.from_mapping({"method": "wanda", "nsamples": "8"})
    assert config.nsamples == 8 and config.technique().pattern == "2:4"


def test_prune_command_is_the_prune_stage(tmp_path, dense_dir, calib_file, monkeypatch):
    seen = []
    entry = registry.lookup("stage", "prune")
    original = entry.implementation.run
    monkeypatch.setattr(entry.implementation, "run", lambda *a, **k: seen.append(a[0]) or original(*a, **k))
    out = tmp_path / "pruned"
    code, output, _ = invoke(
        "prune", dense_dir, "-o", out, "--method", "wanda", "--calibration", calib_file, "--seqlen", 32
    )
    assert code == 0, output
    assert isinstance(seen[0], entry.config) and seen[0].method == "wanda"
    assert seen[0].source == str(calib_file) and (out / "semisparse.json").is_file()
