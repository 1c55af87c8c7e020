"""MaskLLM on the shared training loop: a resumed run equals an uninterrupted one, and the CLI end to end."""

import json
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from train_helpers import isolated_cache, save_tiny_model, tiny_config, untimed_rows, write_corpus  # noqa: F401

from semisparse.cli import main
from semisparse.methods.maskllm import MaskLLMConfig, MaskLLMMethod
from semisparse.nm import is_nm
from semisparse.training.loop import TrainingInterrupted, run

SETTINGS = MaskLLMConfig(prior="magnitude")


class InterruptedMaskLLM(MaskLLMMethod):
    """Sends itself SIGINT after optimizer step `stop_after` (1-based), like a user pressing Ctrl-C."""

    stop_after: int | None = None

    def after_step(self, step):
        metrics = super().after_step(step)
        if step + 1 == self.stop_after:
            signal.raise_signal(signal.SIGINT)
        return metrics


def build(cls, config, initialise=True, **attributes):
    method = cls.from_pretrained(
        config.model, SETTINGS, config.total_steps(), "cpu", seed=config.seed, initialise=initialise
    )
    for key, value in attributes.items():
        setattr(method, key, value)
    return method


@pytest.fixture
def setup(tmp_path):
    return tmp_path, save_tiny_model(tmp_path / "model", "gpt2"), write_corpus(tmp_path / "corpus.jsonl")


def test_interrupted_and_resumed_maskllm_run_is_bit_identical(setup):
    tmp_path, model, corpus = setup
    common = {
        "steps": 4,
        "grad_accum": 2,
        "eval_every": 2,
        "method_name": "maskllm",
        "warmup_steps": 0,
        "lr": 1e-2,
    }
    full = tiny_config(model, tmp_path / "full", corpus, **common)
    run(full, build(MaskLLMMethod, full), progress=False)

    parted = tiny_config(model, tmp_path / "parted", corpus, **common)
    with pytest.raises(TrainingInterrupted, match="after step 2 of 4"):
        run(parted, build(InterruptedMaskLLM, parted, stop_after=2), progress=False)
    run(parted, build(MaskLLMMethod, parted, initialise=False), resume="latest", progress=False)

    expected = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "parted" / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())
    with (
        np.load(tmp_path / "full" / "model" / "masks.npz") as a,
        np.load(tmp_path / "parted" / "model" / "masks.npz") as b,
    ):
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    full_rows = untimed_rows(tmp_path / "full")
    assert untimed_rows(tmp_path / "parted") == full_rows
    train_rows = [row for row in full_rows if row["kind"] == "train"]
    assert train_rows[0]["tau"] == 4.0 and train_rows[-1]["tau"] == pytest.approx(0.05)
    assert all({"mean_max_prob", "regulariser", "loss_task"} <= row.keys() for row in train_rows)
    assert "flip_vs_prior" in train_rows[-1]


def test_cli_lr_is_the_logits_learning_rate_with_maskllm_defaults(setup, monkeypatch):
    import importlib

    import semisparse.training.loop as loop

    cli_train = importlib.import_module("semisparse.cli.train")  # the package re-exports a `train` group

    tmp_path, model, corpus = setup
    seen = []

    def launch(config, make_method, **kwargs):
        seen.append((config.lr, config.warmup_steps))
        return tmp_path

    monkeypatch.setattr(loop, "launch", launch)
    monkeypatch.setattr(cli_train, "_summary", lambda model_dir: "")
    common = ["train", "maskllm", str(model), "--corpus", str(corpus), "--tokens", "256", "--seq-len", "32"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 0.02\nmethod:\n  prior: magnitude\n")
    for extra in (
        ["--lr", "0.003"],
        [],
        ["--recipe", str(recipe)],
        ["--recipe", str(recipe), "--lr", "0.003"],
    ):
        result = CliRunner().invoke(main, [*common, "-o", str(tmp_path / f"lr{len(seen)}"), *extra])
        assert result.exit_code == 0, result.output + result.stderr
    assert seen == [(0.003, 0), (5e-4, 0), (0.02, 0), (0.003, 0)]
    # The logits' lr is a training setting now, not a MaskLLM one.
    result = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "bad"), "--set", "lr=0.02"])
    assert result.exit_code == 2 and "unknown maskllm setting(s) lr" in result.stderr


def test_the_run_lr_is_the_logits_peak_lr(setup):
    from semisparse.training.recipe import method_factory, train_configs

    tmp_path, model, corpus = setup
    config, settings = train_configs(
        "maskllm",
        overrides={
            "model": str(model),
            "output": str(tmp_path / "run"),
            "corpus": str(corpus),
            "lr": "0.003",
        },
        method_settings={"prior": "magnitude"},
    )
    assert (config.lr, config.warmup_steps, config.method["prior"]) == (0.003, 0, "magnitude")
    method = method_factory(config, settings, progress=False)(1, "cpu", True)
    optimizer = method.make_optimizer(method.parameter_groups(), config)
    logits = {id(layer.logits) for layer in method.layers.values()}
    assert [
        group["lr"] for group in optimizer.param_groups if {id(p) for p in group["params"]} == logits
    ] == [0.003]


def test_cli_train_maskllm_writes_a_2_4_model_and_mask_file(setup):
    tmp_path, model, corpus = setup
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("the sparse model keeps two of four weights " * 40)
    args = [
        "train", "maskllm", str(model), "-o", str(tmp_path / "run"), "--corpus", str(corpus),
        "--tokens", "256", "--seq-len", "32", "--micro-batch", "2", "--eval-windows", "1",
        "--eval-seqlen", "32", "--eval-corpus", str(eval_text), "--quiet",
        "--set", "prior=magnitude", "--lr", "0.01", "--set", "hard=true",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "run" / "model"
    meta = json.loads((out / "semisparse.json").read_text())
    assert meta["method"] == "maskllm" and meta["pattern"] == "2:4" and meta["base_model"] == str(model)
    assert meta["settings"]["hard"] is True and meta["training"]["steps"] == 4
    assert meta["training"]["config"]["lr"] == 0.01
    weights = load_file(out / "model.safetensors")
    assert is_nm(weights["transformer.h.0.mlp.c_fc.weight"].t(), 2, 4)
    with np.load(out / "masks.npz") as masks:
        assert "transformer.h.0.mlp.c_fc.weight.mask" in masks.files
    assert CliRunner().invoke(main, ["info", str(out)]).exit_code == 0
    # The shipped mask file alone turns the dense model into exactly the exported MaskLLM model.
    applied = tmp_path / "applied"
    result = CliRunner().invoke(main, ["apply-mask", str(model), str(out / "masks.npz"), "-o", str(applied)])
    assert result.exit_code == 0, result.stderr
    again = load_file(applied / "model.safetensors")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
