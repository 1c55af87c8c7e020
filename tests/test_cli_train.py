"""`semisparse train`: flags and recipes become a TrainConfig, a dense run goes end to end, mistakes fail
with `error:` and exit status 2."""

import json

import pytest
import yaml
from click.testing import CliRunner
from train_helpers import isolated_cache, save_tiny_model, write_corpus, write_eval_text  # noqa: F401
from transformers import AutoModelForCausalLM

from semisparse.cli import main


@pytest.fixture
def inputs(tmp_path):
    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    evaluation = write_eval_text(tmp_path / "eval.txt")
    return model, corpus, evaluation


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output, result.stderr


def small_run(model, corpus, evaluation, out, *extra):
    return invoke(
        "train", "dense", model, "-o", out, "--corpus", corpus, "--tokens", "256", "--seq-len", 32,
        "--micro-batch", 2, "--eval-windows", 2, "--eval-corpus", evaluation, "--lr", "1e-3", "--quiet",
        *extra,
    )  # fmt: skip


def test_train_dense_end_to_end(inputs, tmp_path):
    code, output, stderr = small_run(*inputs, tmp_path / "run")
    assert code == 0, stderr
    assert "saved" in output and "4 steps, 256 tokens, perplexity" in output
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["tokens"] == 256 and saved["method_name"] == "dense" and saved["eval_seqlen"] is None
    code, _, stderr = small_run(*inputs, tmp_path / "run")
    assert code == 2 and stderr.startswith("error: output directory") and "--overwrite" in stderr


def test_recipe_and_set_fill_config_flags_win(inputs, tmp_path):
    model, corpus, evaluation = inputs
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"lr": 5e-3, "seq_len": 16, "warmup_steps": 0, "method": {"train_embeddings": False}})
    )
    code, _, stderr = small_run(
        model, corpus, evaluation, tmp_path / "run", "--recipe", recipe, "--set", "decay_norms_and_biases=yes"
    )
    assert code == 0, stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 1e-3  # the flag beats the recipe
    assert saved["seq_len"] == 32 and saved["warmup_steps"] == 0
    assert saved["method"]["decay_norms_and_biases"] is True and saved["method"]["train_embeddings"] is False
    assert saved["method"]["distill"] is False
    meta = json.loads((tmp_path / "run" / "model" / "semisparse.json").read_text())
    assert meta["settings"]["train_embeddings"] is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--tokens", "lots"), "cannot read the token budget 'lots'"),
        (("--tokens", "10"), "smaller than one optimizer step"),
        (("--lr", "-1"), "--lr=-1.0 must be > 0"),
        (("--seq-len", "abc"), "--seq-len='abc' must be a number"),
        (("--warmup-steps", "9"), "lower --warmup-steps or raise --tokens"),
        (("--device", "tpu"), "--device='tpu' must be cpu, cuda or cuda:N"),
        (("--seq-len", "1024", "--tokens", "100k"), "exceeds the model's context of 256"),
        (("--set", "nonsense=1"), "unknown dense setting(s) nonsense"),
        (("--set", "train_embeddings=maybe"), "--set train_embeddings='maybe' must be true or false"),
        (("--set", "temperature=0"), "--set temperature=0.0 must be > 0"),
        (("--set", "novalue"), "is not key=value"),
        (("--resume",), "has no checkpoint to resume from"),
        (("--resume", "--overwrite"), "--resume and --overwrite contradict"),
        (("--tokens", "1e400"), "token budget 1e400 is not a finite number"),
        (("--grad-clip", "nan"), "--grad-clip='nan' must be a finite number"),
        (("--lr", "inf"), "--lr='inf' must be a finite number"),
        (("--warmup-steps", "2.5"), "--warmup-steps='2.5' must be a whole number"),
    ],
)
def test_bad_flags_are_one_line_errors(inputs, tmp_path, extra, message):
    if extra[0] == "--resume":
        (tmp_path / "run").mkdir()
    code, _, stderr = small_run(*inputs, tmp_path / "run", *extra)
    assert code == 2
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1


def test_unknown_corpus_is_rejected(inputs, tmp_path):
    model, _, evaluation = inputs
    code, _, stderr = small_run(model, "wikipeda", evaluation, tmp_path / "run")
    assert code == 2 and "unknown corpus 'wikipeda'" in stderr


def test_method_commands_are_listed():
    code, output, _ = invoke("train", "--help")
    assert code == 0 and all(name in output for name in ("dense", "ast", "maskllm"))
    code, output, _ = invoke("train", "maskllm", "--help")
    assert code == 0 and "--set KEY=VALUE" in output and "--tokens" in output
    assert "Peak learning rate of the mask logits (default 0.0005)" in " ".join(output.split())
    code, output, _ = invoke("train", "nonsense", "--help")
    assert code == 2


def test_commands_come_from_the_registry(monkeypatch):
    from dataclasses import replace

    from semisparse import registry

    entry = registry.lookup("trainer", "dense")
    monkeypatch.setitem(
        registry._ENTRIES, ("trainer", "dense2"), replace(entry, name="dense2", summary="Another trainer.")
    )
    code, output, _ = invoke("train", "--help")
    assert code == 0 and "dense2" in output and "Another trainer." in output


def test_method_setting_errors_name_the_set_option(inputs, tmp_path):
    model, corpus, _ = inputs
    code, _, stderr = invoke(
        "train", "ast", model, "-o", tmp_path / "run", "--corpus", corpus, "--tokens", "256", "--seq-len", 32,
        "--micro-batch", 2, "--eval-windows", 0, "--quiet", "--set", "init=wanda",
        "--set", "calibration_seqlen=4096",
    )  # fmt: skip
    assert code == 2 and "--set calibration_seqlen=... 4096 exceeds the model's context of 256" in stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("grad_clip: .nan", "--grad-clip=nan must be a finite number"),
        ("lr: .inf", "--lr=inf must be a finite number"),
        ("warmup_steps: 2.5", "--warmup-steps=2.5 must be a whole number"),
    ],
)
def test_recipe_values_yaml_reads_as_non_finite_are_rejected(inputs, tmp_path, values, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(values + "\n")
    model, corpus, _ = inputs
    code, _, stderr = invoke(
        "train", "dense", model, "-o", tmp_path / "run", "--corpus", corpus, "--tokens", "256",
        "--seq-len", 32, "--micro-batch", 2, "--eval-windows", 0, "--quiet", "--recipe", recipe,
    )  # fmt: skip
    assert code == 2 and message in stderr and stderr.count("\n") == 1


def test_output_that_is_or_contains_the_input_model_is_refused(inputs, tmp_path):
    """A run's exported model trained again with `-o` on itself (or its run) must not be deleted."""
    _, _, evaluation = inputs
    assert small_run(*inputs, tmp_path / "run")[0] == 0
    model = tmp_path / "run" / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(256)) * 8)
    for out in (model, tmp_path / "run"):
        code, _, stderr = small_run(model, garbage, evaluation, out, "--overwrite")
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert "is or contains the input model" in stderr and "choose another --output" in stderr
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_overwrite_with_a_bad_corpus_keeps_the_old_run(inputs, tmp_path):
    model, _, evaluation = inputs
    out = tmp_path / "run"
    assert small_run(*inputs, out)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(256)) * 8)
    code, _, stderr = small_run(model, garbage, evaluation, out, "--overwrite")
    assert code == 2 and "is not UTF-8 text" in stderr and stderr.count("\n") == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    code, _, stderr = small_run(*inputs, out, "--overwrite", "--seed", 1)
    assert code == 0, stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_with_another_lr_needs_the_flag(inputs, tmp_path):
    out = tmp_path / "run"
    code, _, _ = small_run(*inputs, out, "--tokens", "512", "--checkpoint-every", 2)
    assert code == 0
    (out / "model" / "semisparse.json").unlink()
    for path in (out / "model").iterdir():
        path.unlink()
    (out / "model").rmdir()  # as if the export had failed: the final checkpoint is there
    code, _, stderr = small_run(*inputs, out, "--tokens", "512", "--resume", "--lr", "5e-4")
    assert code == 2 and "another schedule" in stderr and "add --allow-schedule-change" in stderr
    code, _, stderr = small_run(
        *inputs, out, "--tokens", "512", "--resume", "--lr", "5e-4", "--allow-schedule-change"
    )
    assert code == 0, stderr
    assert "new schedule: lr 0.001 -> 0.0005" in stderr


def test_double_sigterm_names_the_checkpoint(inputs, tmp_path, monkeypatch):
    import signal

    from semisparse.methods.dense import DenseMethod

    def after_step(self, step):
        if step == 2:  # during step 3, after the checkpoint of step 2
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return {}

    monkeypatch.setattr(DenseMethod, "after_step", after_step)
    code, _, stderr = small_run(*inputs, tmp_path / "run", "--checkpoint-every", 2)
    assert code == 130 and "nothing was written" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: aborted after step 2 of 4; the last checkpoint is ")
    assert "step-00000002" in last and last.endswith("--resume")


def test_resume_with_another_set_value_names_the_setting(inputs, tmp_path):
    """Issue 13 §4.6: the refusal names the differing method setting with both values, in one line."""
    out = tmp_path / "run"
    code, _, _ = small_run(*inputs, out, "--tokens", "512", "--checkpoint-every", 2)
    assert code == 0
    for path in (out / "model").iterdir():
        path.unlink()
    (out / "model").rmdir()  # as if the export had failed: the final checkpoint is there
    code, _, stderr = small_run(
        *inputs, out, "--tokens", "512", "--resume", "--set", "decay_norms_and_biases=yes"
    )
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "different run (checkpoint -> now: method.decay_norms_and_biases: false -> true)" in stderr
