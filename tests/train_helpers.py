"""Shared pieces of the training-loop tests: a tiny saved model, a tiny corpus, a small config."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.training.config import TrainConfig

WORDS = [
    *("the", "a", "sparse", "model", "keeps", "two", "of", "four", "weights", "in", "each"),
    *("group", "while", "dense", "ones", "keep", "all"),
]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Token caches go to the test's own directory, never to ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEMISPARSE_CACHE_DIR", str(cache))
    return cache


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model plus the tiny tokenizer in one directory, loadable by name like a real one."""
    make_tiny_model(arch, seed).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def write_corpus(path: Path, documents: int = 60, seed: int = 0) -> Path:
    """A JSONL corpus of short pseudo-sentences from a small vocabulary (learnable in a few steps)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def write_eval_text(path: Path) -> Path:
    path.write_text(" ".join(WORDS * 40))
    return path


def tiny_config(
    model: Path | str, out: Path | str, corpus: Path | str, steps: int = 4, **overrides: Any
) -> TrainConfig:
    """Steps of 2 sequences x 32 tokens, 1 warm-up step, eval on a small local text."""
    out = Path(out)
    settings: dict[str, Any] = {
        "model": str(model),
        "output": str(out),
        "corpus": str(corpus),
        "seq_len": 32,
        "micro_batch": 2,
        "grad_accum": 1,
        "lr": 1e-3,
        "warmup_steps": 1,
        "eval_every": 0,
        "eval_windows": 2,
        "eval_seqlen": 32,
        "eval_corpus": str(write_eval_text(out.parent / "eval.txt")),
        "checkpoint_every": 0,
        "method_name": "dense",
    }
    settings.update(overrides)
    per_step = settings["seq_len"] * settings["micro_batch"] * settings["grad_accum"]
    settings.setdefault("tokens", steps * per_step)
    return TrainConfig(**settings)


def dense_method(config: TrainConfig, initialise: bool = True) -> DenseMethod:
    return DenseMethod.from_pretrained(config.model, DenseConfig(), 0, "cpu", initialise=initialise)


# Wall-clock columns of metrics.jsonl: they differ between otherwise identical runs.
TIMING = {"step_seconds", "tokens_per_s", "memory_bytes"}


def untimed_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl without the timing columns, for comparing two runs."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]
