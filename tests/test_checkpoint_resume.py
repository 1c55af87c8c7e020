"""Checkpoints: an interrupted and resumed run equals an uninterrupted one bit for bit; bad checkpoints and
non-finite losses fail cleanly without touching the last good checkpoint."""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import isolated_cache, save_tiny_model, tiny_config, untimed_rows, write_corpus  # noqa: F401

from semisparse.errors import SemisparseError
from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.training.checkpoint import list_checkpoints
from semisparse.training.loop import TrainingInterrupted, run


class InterruptedDense(DenseMethod):
    """Sends itself SIGINT after optimizer step `stop_after` (1-based), like a user pressing Ctrl-C."""

    stop_after: int | None = None

    def after_step(self, step):
        if step + 1 == self.stop_after:
            signal.raise_signal(signal.SIGINT)
        return {}


class NaNDense(DenseMethod):
    """Returns a NaN loss at the given (0-based) steps."""

    nan_steps: frozenset[int] = frozenset()

    def loss(self, batch, step):
        loss, parts = super().loss(batch, step)
        return (loss * float("nan") if step in self.nan_steps else loss), parts


def build(cls, config, initialise=True, **attributes):
    method = cls.from_pretrained(config.model, DenseConfig(), 0, "cpu", initialise=initialise)
    for key, value in attributes.items():
        setattr(method, key, value)
    return method


@pytest.fixture
def setup(tmp_path):
    # GPT-2 has dropout 0.1, so the resumed run only matches if the RNG state is restored too.
    model = save_tiny_model(tmp_path / "model", "gpt2")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    return tmp_path, model, corpus


def test_interrupted_and_resumed_run_is_bit_identical(setup):
    tmp_path, model, corpus = setup
    common = {"steps": 6, "grad_accum": 2, "eval_every": 2}
    full = tiny_config(model, tmp_path / "full", corpus, **common)
    run(full, build(DenseMethod, full), progress=False)

    parted = tiny_config(model, tmp_path / "parted", corpus, **common, checkpoint_every=2, keep_checkpoints=2)
    with pytest.raises(TrainingInterrupted, match=r"after step 3 of 6.*`resume`"):
        run(parted, build(InterruptedDense, parted, stop_after=3), progress=False)
    checkpoints = list_checkpoints(tmp_path / "parted")
    assert [step for step, _ in checkpoints] == [2, 3]
    assert not (tmp_path / "parted" / "model").exists()
    # Resuming from the older checkpoint also drops the metrics rows logged after it.
    run(parted, build(DenseMethod, parted, initialise=False), resume=checkpoints[0][1], progress=False)

    expected = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "parted" / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    assert untimed_rows(tmp_path / "parted") == untimed_rows(tmp_path / "full")


def test_dropout_makes_the_rng_matter(setup):
    """Guards the test above: with another seed for dropout the same run ends elsewhere."""
    tmp_path, model, corpus = setup
    finals = []
    for seed in (0, 1):
        config = tiny_config(model, tmp_path / f"seed{seed}", corpus, steps=2, seed=seed, eval_windows=0)
        run(config, build(DenseMethod, config), progress=False)
        finals.append(load_file(tmp_path / f"seed{seed}" / "model" / "model.safetensors"))
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


@pytest.fixture
def interrupted(setup):
    tmp_path, model, corpus = setup
    config = tiny_config(model, tmp_path / "run", corpus, steps=4, eval_windows=0)
    with pytest.raises(TrainingInterrupted):
        run(config, build(InterruptedDense, config, stop_after=2), progress=False)
    return config, list_checkpoints(tmp_path / "run")[-1][1]


def test_corrupt_checkpoint_is_a_clear_error(interrupted):
    config, checkpoint = interrupted
    with open(checkpoint / "state.pt", "r+b") as handle:
        handle.seek(200)
        handle.write(b"garbage")
    with pytest.raises(SemisparseError, match="is corrupt"):
        run(config, build(DenseMethod, config, initialise=False), resume="latest", progress=False)


def test_checkpoint_of_another_run_is_refused(interrupted):
    config, checkpoint = interrupted
    changed = tiny_config(config.model, config.output, config.corpus, steps=4, eval_windows=0, lr=5e-4)
    with pytest.raises(SemisparseError, match=r"different run \(config.lr: 0.001 vs 0.0005\)"):
        run(changed, build(DenseMethod, changed, initialise=False), resume=checkpoint, progress=False)


def test_existing_output_needs_resume_or_overwrite(interrupted):
    config, _ = interrupted
    with pytest.raises(SemisparseError, match=r"already exists.*`resume`.*`overwrite`"):
        run(config, build(DenseMethod, config), progress=False)
    run(config, build(DenseMethod, config), overwrite=True, progress=False)
    assert (Path(config.output) / "model" / "model.safetensors").is_file()


def test_single_nan_step_is_skipped_and_logged(setup):
    tmp_path, model, corpus = setup
    config = tiny_config(model, tmp_path / "run", corpus, steps=4, eval_windows=0)
    run(config, build(NaNDense, config, nan_steps=frozenset({1})), progress=False)
    logged = untimed_rows(tmp_path / "run")
    assert [row["kind"] for row in logged] == ["train", "skip", "train", "train"]
    assert logged[1]["loss"] == "nan" and logged[-1]["skipped_steps"] == 1
    meta = json.loads((tmp_path / "run" / "model" / "semisparse.json").read_text())
    assert meta["training"]["skipped_steps"] == 1
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_nan_steps_stop_and_keep_the_last_good_checkpoint(setup):
    tmp_path, model, corpus = setup
    config = tiny_config(
        model, tmp_path / "run", corpus, steps=10, eval_windows=0, checkpoint_every=2, max_bad_steps=3
    )
    method = build(NaNDense, config, nan_steps=frozenset(range(4, 10)))
    with pytest.raises(SemisparseError, match=r"not finite for 3 steps.*step-00000004"):
        run(config, method, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4]
