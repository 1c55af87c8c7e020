"""The loop end to end with dense fine-tuning: it learns, logs well-formed metrics, exports a plain model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import isolated_cache, save_tiny_model, tiny_config, write_corpus  # noqa: F401
from transformers import AutoModelForCausalLM

from semisparse.data import file_sha256
from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.training.checkpoint import list_checkpoints, model_identity
from semisparse.training.config import TrainConfig
from semisparse.training.loop import TrainingMethod, run
from semisparse.training.schedule import WarmupCosine

TRAIN_KEYS = {"kind", "step", "tokens", "loss", "lr", "grad_norm", "skipped_steps", "epoch", "tokens_per_s"}


def train(config):
    method = DenseMethod.from_pretrained(config.model, DenseConfig(), 0, "cpu")
    assert isinstance(method, TrainingMethod)
    return run(config, method, progress=False)


@pytest.fixture
def finished(tmp_path):
    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_config(model, tmp_path / "run", corpus, steps=16, lr=3e-3, warmup_steps=2, eval_every=8)
    return config, train(config)


def metrics(config):
    return [json.loads(line) for line in Path(config.output, "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases(finished):
    config, _ = finished
    rows = metrics(config)
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    evals = [row["eval_ppl"] for row in rows if row["kind"] == "eval"]
    assert evals[-1] < evals[0]


def test_metrics_are_well_formed(finished):
    config, _ = finished
    rows = metrics(config)
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(1, 17))
    schedule = WarmupCosine(16, 2, 0.1)
    for row in train_rows:
        assert row.keys() >= TRAIN_KEYS
        assert row["tokens"] == row["step"] * 2 * 32
        assert row["lr"] == pytest.approx(3e-3 * schedule(row["step"] - 1))
        assert row["memory_bytes"] > 0
    assert [(row["step"], row["eval_windows"]) for row in rows if row["kind"] == "eval"] == [
        (0, 2),
        (8, 2),
        (16, 2),
    ]


def test_export_loads_in_plain_transformers_with_provenance(finished, tmp_path):
    config, model_dir = finished
    assert model_dir == tmp_path / "run" / "model"
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    initial = AutoModelForCausalLM.from_pretrained(config.model)
    assert not torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight
    )
    assert (model_dir / "tokenizer.json").is_file()
    meta = json.loads((model_dir / "semisparse.json").read_text())
    assert meta["method"] == "dense" and meta["base_model"] == config.model
    pinned = model_identity(config.model)
    assert meta["base_model_path"] == str(Path(config.model).resolve()) == pinned["path"]
    assert meta["base_model_sha256"] == pinned["sha256"] and len(pinned["sha256"]) == 64
    record = meta["training"]
    assert record["steps"] == 16 and record["tokens_seen"] == 16 * 64
    assert record["corpus"]["sha256"] == file_sha256(config.corpus)
    assert record["final_eval"]["eval_ppl"] > 1
    assert record["base_model"]["sha256"] == pinned["sha256"] and record["schedule_changes"] == []
    # The last step is checkpointed before the export, so a failed export loses no training.
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [16]
    assert TrainConfig.from_mapping(record["config"]) == config
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml") == config


def test_accumulation_and_checkpointing_match_a_plain_large_batch(tmp_path):
    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    finals = []
    for name, micro, accum, recompute in (
        ("big", 4, 1, False),
        ("accumulated", 2, 2, False),
        ("gc", 4, 1, True),
    ):
        config = tiny_config(
            model, tmp_path / name, corpus, steps=2, micro_batch=micro, grad_accum=accum, eval_windows=0,
            gradient_checkpointing=recompute,
        )  # fmt: skip
        method = DenseMethod.from_pretrained(config.model, DenseConfig(), 0, "cpu")
        finals.append(load_file(run(config, method, progress=False) / "model.safetensors"))
        assert method.model.is_activation_checkpointing == recompute
    for other in finals[1:]:
        for key, tensor in finals[0].items():
            torch.testing.assert_close(other[key], tensor, rtol=1e-4, atol=1e-6)
