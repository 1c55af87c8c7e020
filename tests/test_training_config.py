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
        ({"lr": 0.0}, "`lr`=0.0 must be > 0"),
        ({"lr": -1e-4}, "`lr`=-0.0001 must be > 0"),
        ({"lr": float("inf")}, "`lr`=inf must be a finite number"),
        ({"seq_len": 1}, "`seq_len`=1 must be >= 2"),
        ({"micro_batch": 0}, "`micro_batch`=0 must be >= 1"),
        ({"grad_accum": 1.5}, "`grad_accum`=1.5 must be a whole number"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"warmup_steps": 10**9}, "warm-up"),
        ({"warmup_steps": 2.5}, "`warmup_steps`=2.5 must be a whole number or None"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": 5}, "`betas`=5 must be 2 values"),
        ({"grad_clip": -1}, "grad_clip"),
        ({"grad_clip": float("nan")}, "`grad_clip`=nan must be a finite number"),
        ({"tokens": "1e400"}, "token budget 1e400 is not a finite number"),
        ({"tokens": 1e400}, "token budget inf is not a finite number"),
        ({"tokens": 10**400}, "is not a finite number"),
        ({"device": "tpu"}, "`device`='tpu' must be cpu, cuda or cuda:N"),
        ({"autocast": "fp8"}, "`autocast`='fp8' must be one of auto, bf16, off"),
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
    with pytest.raises(SemisparseError, match="`seq_len` to 256 or less"):
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


def test_yaml_style_strings_are_coerced_once(tmp_path, corpus):
    (tmp_path / "recipe.yaml").write_text(
        f"model: m\noutput: o\ncorpus: {corpus}\neval_windows: 0\neps: 1e-8\nlr: 3e-4\ntokens: 2M\n"
        "betas: [0.8, 0.9]\nwarmup_steps: null\n"
    )
    config = TrainConfig.from_yaml(tmp_path / "recipe.yaml")
    assert (config.eps, config.lr, config.tokens, config.betas) == (1e-8, 3e-4, 2_000_000, (0.8, 0.9))
    assert config.warmup_steps is None
    (tmp_path / "huge.yaml").write_text(f"model: m\noutput: o\ncorpus: {corpus}\ntokens: 1.0e+400\n")
    with pytest.raises(SemisparseError, match="not a finite number"):
        TrainConfig.from_yaml(tmp_path / "huge.yaml")


def test_config_without_model_or_output_is_rejected(corpus):
    with pytest.raises(SemisparseError, match="lacks `output`"):
        TrainConfig.from_mapping({"model": "m", "corpus": str(corpus)})


def test_every_setting_is_described():
    from semisparse.settings import describe

    rows = {row.name: row for row in describe(TrainConfig)}
    assert rows["lr"].type == "float" and rows["lr"].default == 2e-4 and rows["lr"].help
    assert rows["model"].default == "(required)"
    assert all(row.help for row in rows.values())


@pytest.mark.parametrize("name", ["dense", "ast", "maskllm"])
def test_trainers_are_registered_with_described_configs(name):
    from semisparse import registry
    from semisparse.settings import describe
    from semisparse.training.method import MethodConfig, TrainingMethod

    entry = registry.lookup("trainer", name)
    assert issubclass(entry.config, MethodConfig) and issubclass(entry.implementation, TrainingMethod)
    assert entry.implementation.name == name and entry.summary
    rows = describe(entry.config)
    assert rows and all(row.help and row.type for row in rows)
    assert set(entry.config.train_defaults) <= {row.name for row in describe(TrainConfig)}


def test_recipe_defaults_recipe_and_explicit_values_merge_in_order(tmp_path, corpus):
    from semisparse.training.recipe import train_configs

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"corpus: {corpus}\neval_windows: 0\nseq_len: 16\nlr: 1e-3\nmethod:\n  prior: magnitude\n  alpha: 2\n"
    )
    config, settings = train_configs(
        "maskllm", recipe, {"output": "out", "lr": "2e-3"}, {"alpha": "1.5", "hard": "true"}
    )
    assert (config.warmup_steps, config.seq_len, config.lr, config.model) == (0, 16, 2e-3, "smollm2-135m")
    assert (settings.prior, settings.alpha, settings.hard) == ("magnitude", 1.5, True)
    assert config.method_name == "maskllm" and config.method == settings.to_dict()
    recipe.write_text(f"method_name: maskllm\ncorpus: {corpus}\n")
    with pytest.raises(SemisparseError, match="is a maskllm recipe, not a ast one"):
        train_configs("ast", recipe, {"output": "out"})
    with pytest.raises(SemisparseError, match="unknown trainer 'owl'"):
        train_configs("owl")
