"""TrainConfig: budget parsing, step arithmetic, validation messages, YAML round trip, fingerprint."""

from pathlib import Path

import pytest

from semisparse.errors import SemisparseError
from semisparse.training.config import TrainConfig, parse_tokens


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("some text for training")
    return path


def make(corpus_file: Path, **overrides):
    settings = {"model": "m", "output": "out", "corpus": str(corpus_file), "eval_windows": 0}
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("100M", 100_000_000),
        ("1.5B", 1_500_000_000),
        ("250k", 250_000),
        ("1e6", 1_000_000),
        ("4096", 4096),
        (4096, 4096),
        ("2_000", 2000),
        ("0.5m", 500_000),
    ],
)
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["abc", "0", "-5M", "10X", "", True])
def test_parse_tokens_rejects(text):
    with pytest.raises(SemisparseError, match="token budget"):
        parse_tokens(text)


def test_total_steps_divides_budget_by_global_batch(corpus):
    config = make(corpus, tokens="10k", seq_len=32, micro_batch=2, grad_accum=3)
    assert config.tokens == 10_000
    assert config.tokens_per_step() == 192
    assert config.total_steps() == 10_000 // 192
    assert config.total_steps(world_size=2) == 10_000 // 384
    assert config.warmup(config.total_steps()) == config.total_steps() // 100
    assert make(corpus, tokens="10k", seq_len=32, warmup_steps=5).warmup(7) == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokens": 100, "seq_len": 32, "micro_batch": 4}, "smaller than one optimizer step"),
        ({"lr": 0.0}, "learning rate must be positive"),
        ({"lr": -1e-4}, "learning rate must be positive"),
        ({"seq_len": 1}, "at least 2 tokens"),
        ({"micro_batch": 0}, "micro_batch must be a positive integer"),
        ({"grad_accum": 1.5}, "grad_accum must be a positive integer"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"warmup_steps": 10**9}, "warm-up"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"grad_clip": -1}, "grad_clip"),
        ({"autocast": "fp8"}, "unknown autocast"),
        ({"corpus": "nonsense"}, "unknown corpus 'nonsense'"),
        ({"corpus": "./missing.txt"}, "does not exist"),
        ({"eval_windows": 4, "eval_corpus": "missing-eval.txt"}, "eval corpus"),
        ({"method": ["x"]}, "mapping"),
    ],
)
def test_bad_settings_rejected_with_one_line(corpus, overrides, message):
    with pytest.raises(SemisparseError, match=message) as info:
        make(corpus, **overrides)
    assert "\n" not in str(info.value)


def test_corpus_with_wrong_suffix_rejected(tmp_path):
    wrong = tmp_path / "corpus.csv"
    wrong.write_text("a,b")
    with pytest.raises(SemisparseError, match=r"\.txt, \.jsonl"):
        make(wrong)


def test_budget_rechecked_for_world_size(corpus):
    config = make(corpus, tokens=64, seq_len=32, micro_batch=2)
    config.check_world(1)
    with pytest.raises(SemisparseError, match="over 2 processes"):
        config.check_world(2)


def test_sequence_length_checked_against_model_context(corpus):
    config = make(corpus, seq_len=512, tokens="1M")
    config.check_model(1024)
    with pytest.raises(SemisparseError, match="--seq-len 256 or less"):
        config.check_model(256)


def test_yaml_round_trip(tmp_path, corpus):
    config = make(corpus, tokens="2M", lr=3e-4, betas=(0.8, 0.9), method={"pattern": "2:4", "alpha": 3.0})
    config.to_yaml(tmp_path / "config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == config


def test_yaml_with_unknown_key_rejected(tmp_path, corpus):
    (tmp_path / "bad.yaml").write_text(f"model: m\noutput: o\ncorpus: {corpus}\nlearning_rate: 1\n")
    with pytest.raises(SemisparseError, match="unknown training setting"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_fingerprint_ignores_logging_but_not_training_fields(corpus):
    base = make(corpus, tokens="1M")
    assert make(corpus, tokens="1M", eval_every=7, output="elsewhere", checkpoint_every=3).fingerprint() == (
        base.fingerprint()
    )
    assert make(corpus, tokens="1M", lr=1e-3).fingerprint() != base.fingerprint()
    assert make(corpus, tokens="1M", method={"a": 1}).fingerprint() != base.fingerprint()
