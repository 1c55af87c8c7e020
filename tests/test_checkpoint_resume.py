"""Checkpoints: an interrupted and resumed run equals an uninterrupted one bit for bit; bad checkpoints and
non-finite losses fail cleanly without touching the last good checkpoint."""

import json
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import isolated_cache, save_tiny_model, tiny_config, untimed_rows, write_corpus  # noqa: F401

from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.training import checkpoint as checkpoint_module
from semisparse.training.checkpoint import list_checkpoints, model_identity, save_checkpoint
from semisparse.training.loop import TrainingInterrupted, run
from semisparse.training.schedule import WarmupCosine


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
    changed = tiny_config(config.model, config.output, config.corpus, steps=4, eval_windows=0, weight_decay=0)
    with pytest.raises(
        SemisparseError, match=r"different run \(checkpoint -> now: weight_decay: 0.1 -> 0.0\)"
    ):
        run(changed, build(DenseMethod, changed, initialise=False), resume=checkpoint, progress=False)
    # A schedule-only change is refused too unless asked for explicitly (see the test below).
    changed = tiny_config(config.model, config.output, config.corpus, steps=4, eval_windows=0, lr=5e-4)
    with pytest.raises(
        SemisparseError,
        match=r"another schedule \(checkpoint -> now: lr: 0.001 -> 0.0005\).*`allow_schedule_change`",
    ):
        run(changed, build(DenseMethod, changed, initialise=False), resume=checkpoint, progress=False)
    # Even the same schedule may be resumed with the flag: nothing changed, nothing is logged.
    run(
        config,
        build(DenseMethod, config, initialise=False),
        resume="latest",
        allow_schedule_change=True,
        progress=False,
    )
    assert not [row for row in untimed_rows(Path(config.output)) if row["kind"] == "event"]


def test_refused_resume_names_every_differing_setting_in_full(setup):
    """Each differing key is named, method settings one by one, with whole values (issue 13 §4.6)."""
    tmp_path, model, corpus = setup
    teacher = "/models/" + "a-rather-long-teacher-directory-name/" * 3
    settings = {"mask_update_every": 10, "mask_score": "magnitude", "teacher": teacher, "decay_lambda": 2e-4}
    config = tiny_config(model, tmp_path / "run", corpus, steps=4, eval_windows=0, method=settings)
    with pytest.raises(TrainingInterrupted):
        run(config, build(InterruptedDense, config, stop_after=2), progress=False)
    changed_settings = {**settings, "mask_update_every": 0, "teacher": teacher + "v2", "slorb": True}
    del changed_settings["decay_lambda"]
    changed = tiny_config(
        model, tmp_path / "run", corpus, steps=4, eval_windows=0, weight_decay=0, method=changed_settings
    )
    with pytest.raises(SemisparseError) as info:
        run(changed, build(DenseMethod, changed, initialise=False), resume="latest", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert "different run (checkpoint -> now: " in message
    assert "method.mask_update_every: 10 -> 0" in message
    assert "method.decay_lambda: 0.0002 -> (unset)" in message
    assert "method.slorb: (unset) -> true" in message
    assert "weight_decay: 0.1 -> 0.0" in message
    assert f'method.teacher: "{teacher}" -> "{teacher}v2"' in message  # 123 characters: not cut
    assert "mask_score" not in message  # unchanged settings are not listed


def test_long_differing_values_are_cut_around_the_difference():
    layers = list(range(300))
    changed = [*layers[:150], -1, *layers[151:]]
    before = {"config.method": {"layers": layers}, "world_size": 1}
    after = {"config.method": {"layers": changed}, "world_size": 2}
    detail = checkpoint_module.describe_differences(before, after, ["config.method", "world_size"])
    shown, world = detail.split(", world_size: ")
    assert world == "1 -> 2"
    old, new = shown.removeprefix("method.layers: ").split(" -> ")
    assert (
        old.startswith("...")
        and "149, 150, 151" in old
        and old.endswith(f"... ({len(json.dumps(layers))} chars)")
    )
    assert (
        new.startswith("...")
        and "149, -1, 151" in new
        and new.endswith(f"... ({len(json.dumps(changed))} chars)")
    )
    assert len(old) < 250 and len(new) < 250


def test_schedule_change_on_resume_is_explicit_and_recorded(interrupted):
    config, _ = interrupted  # stopped after step 2 of 4, lr 1e-3, 1 warm-up step
    changed = tiny_config(
        config.model, config.output, config.corpus, steps=4, eval_windows=0, lr=5e-4, grad_clip=0.5,
        warmup_steps=0,
    )  # fmt: skip
    method = build(DenseMethod, changed, initialise=False)
    run(changed, method, resume="latest", allow_schedule_change=True, progress=False)
    rows = untimed_rows(Path(config.output))
    events = [row for row in rows if row["kind"] == "event"]
    assert events == [
        {
            "kind": "event",
            "event": "schedule_change",
            "step": 2,
            "changes": {"grad_clip": [1.0, 0.5], "lr": [0.001, 0.0005], "warmup_steps": [1, 0]},
        }
    ]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert [row["step"] for row in train_rows] == [1, 2, 3, 4]
    old, new = WarmupCosine(4, 1, 0.1), WarmupCosine(4, 0, 0.1)
    assert [row["lr"] for row in train_rows[:2]] == pytest.approx([1e-3 * old(0), 1e-3 * old(1)])
    assert [row["lr"] for row in train_rows[2:]] == pytest.approx([5e-4 * new(2), 5e-4 * new(3)])
    meta = json.loads((Path(config.output) / "model" / "semisparse.json").read_text())
    assert meta["training"]["schedule_changes"] == [{"step": 2, "changes": events[0]["changes"]}]
    assert meta["training"]["config"]["lr"] == 5e-4


def test_nan_abort_advice_works(setup):
    """The advice after a divergence (resume with a lower lr and `allow_schedule_change`) is accepted."""
    tmp_path, model, corpus = setup
    common = {"steps": 8, "eval_windows": 0, "checkpoint_every": 2, "max_bad_steps": 2}
    config = tiny_config(model, tmp_path / "run", corpus, **common)
    with pytest.raises(
        SemisparseError,
        match=r"step-00000004; continue from it with `resume`, a lower `lr` and `allow_schedule_change`",
    ):
        run(config, build(NaNDense, config, nan_steps=frozenset(range(4, 8))), progress=False)
    lower = tiny_config(model, tmp_path / "run", corpus, **common, lr=1e-4)
    run(
        lower,
        build(DenseMethod, lower, initialise=False),
        resume="latest",
        allow_schedule_change=True,
        progress=False,
    )
    rows = untimed_rows(tmp_path / "run")
    assert [row["step"] for row in rows if row["kind"] == "train"] == list(range(1, 9))
    assert [row["changes"] for row in rows if row["kind"] == "event"] == [{"lr": [0.001, 0.0001]}]


def test_resume_refuses_a_changed_corpus(interrupted):
    config, _ = interrupted
    Path(config.corpus).write_text(Path(config.corpus).read_text().replace("sparse", "dense"))
    with pytest.raises(SemisparseError, match=r"the corpus changed since checkpoint .*step-00000002") as info:
        run(config, build(DenseMethod, config, initialise=False), resume="latest", progress=False)
    assert "\n" not in str(info.value)


def test_resume_refuses_swapped_model_weights(interrupted):
    config, _ = interrupted
    save_tiny_model(Path(config.model), "gpt2", seed=1)
    with pytest.raises(SemisparseError, match=r"the base model's weights changed since checkpoint") as info:
        run(config, build(DenseMethod, config, initialise=False), resume="latest", progress=False)
    assert "\n" not in str(info.value)


def test_checkpoint_pins_corpus_and_model(interrupted):
    config, checkpoint = interrupted
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    assert meta["inputs"]["corpus"]["sha256"] == file_sha256(config.corpus)
    assert meta["inputs"]["model"] == model_identity(config.model)
    assert meta["inputs"]["model"]["path"] == str(Path(config.model).resolve())


def test_model_identity_hashes_weight_files(tmp_path, isolated_cache):  # noqa: F811
    model = save_tiny_model(tmp_path / "model", "llama")
    first = model_identity(str(model))
    assert first == model_identity(str(model))  # the second time from the hash cache
    (model / "README.md").write_text("not a weight file")
    assert model_identity(str(model)) == first
    save_tiny_model(model, "llama", seed=1)
    assert model_identity(str(model))["sha256"] != first["sha256"]
    assert model_identity("no-such-org/no-such-model") == {"path": None, "sha256": None}


def test_state_without_rng_is_a_clear_error(interrupted):
    config, checkpoint = interrupted
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    del state["rng"]
    torch.save(state, checkpoint / "state.pt")
    meta = json.loads((checkpoint / "checkpoint.json").read_text())
    meta["sha256"] = file_sha256(checkpoint / "state.pt")
    (checkpoint / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(SemisparseError, match=r"is incomplete \(state.pt lacks rng\)") as info:
        run(config, build(DenseMethod, config, initialise=False), resume="latest", progress=False)
    assert "\n" not in str(info.value)


class DoublyInterruptedDense(DenseMethod):
    """Two signals during step `stop_after` (1-based): the second aborts without finishing the step."""

    stop_after: int | None = None
    signum = signal.SIGINT

    def after_step(self, step):
        if step + 1 == self.stop_after:
            signal.raise_signal(self.signum)
            signal.raise_signal(self.signum)
        return {}


def test_second_signal_names_the_last_checkpoint(setup):
    tmp_path, model, corpus = setup
    config = tiny_config(model, tmp_path / "run", corpus, steps=6, eval_windows=0, checkpoint_every=2)
    with pytest.raises(
        TrainingInterrupted,
        match=r"aborted after step 2 of 6; the last checkpoint is .*step-00000002.*`resume`",
    ):
        run(
            config, build(DoublyInterruptedDense, config, stop_after=3, signum=signal.SIGTERM), progress=False
        )
    fresh = tiny_config(model, tmp_path / "fresh", corpus, steps=6, eval_windows=0, checkpoint_every=4)
    with pytest.raises(TrainingInterrupted, match=r"aborted after step 2 of 6; no checkpoint was written"):
        run(fresh, build(DoublyInterruptedDense, fresh, stop_after=3), progress=False)


def test_stale_temporary_directories_are_removed_on_resume(interrupted):
    config, _ = interrupted
    out = Path(config.output)
    leftovers = [
        out / "checkpoints" / ".step-00000003.tmp-abc123",
        out / "checkpoints" / ".step-00000002.old-def456",
        out / ".model.tmp-ghi789",
        out.parent / f".{out.name}.overwrite-jkl012",
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "state.pt").write_bytes(b"half written")
    run(config, build(DenseMethod, config, initialise=False), resume="latest", progress=False)
    assert not any(path.exists() for path in leftovers)
    assert (out / "model" / "model.safetensors").is_file()


def test_checkpoint_write_failure_is_one_line(setup, monkeypatch):
    """A checkpoints/ directory that became read-only mid-run (simulated: the tests may run as root)."""
    tmp_path, model, corpus = setup
    config = tiny_config(model, tmp_path / "run", corpus, steps=6, eval_windows=0, checkpoint_every=2)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(
        SemisparseError,
        match=r"cannot write checkpoint .*step-00000004 \(Permission denied\); the last checkpoint is .*002",
    ) as info:
        run(config, build(DenseMethod, config), progress=False)
    assert "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]


def test_checkpoints_are_fsynced_before_older_ones_are_deleted(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rmtree = checkpoint_module.fsync_path, shutil.rmtree
    monkeypatch.setattr(
        checkpoint_module, "fsync_path", lambda path: events.append(("fsync", path.name)) or real_fsync(path)
    )
    monkeypatch.setattr(
        shutil,
        "rmtree",
        lambda path, **kw: events.append(("delete", Path(path).name)) or real_rmtree(path, **kw),
    )
    state = {"model": {"w": torch.zeros(2)}}
    save_checkpoint(tmp_path, 1, state, {}, keep=1)
    events.clear()
    save_checkpoint(tmp_path, 2, state, {}, keep=1)
    names = [name for _, name in events]
    assert events[:2] == [("fsync", "state.pt"), ("fsync", "checkpoint.json")]
    assert events[2][1].startswith(".step-00000002.tmp-")  # the directory, before its rename
    assert events[3:] == [("fsync", "checkpoints"), ("delete", "step-00000001")]
    assert names.index("checkpoints") < names.index("step-00000001")


def test_final_checkpoint_lets_a_failed_export_be_redone(setup):
    tmp_path, model, corpus = setup
    common = {"steps": 4, "eval_every": 2}
    full = tiny_config(model, tmp_path / "full", corpus, **common)
    run(full, build(DenseMethod, full), progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "full")] == [4]  # checkpoint_every is 0

    class FailingExport(DenseMethod):
        def export(self, out_tmp_dir):
            raise SemisparseError("disk full while exporting")

    parted = tiny_config(model, tmp_path / "parted", corpus, **common)
    with pytest.raises(SemisparseError, match="disk full"):
        run(parted, build(FailingExport, parted), progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "parted")] == [4]
    assert not (tmp_path / "parted" / "model").exists()
    run(parted, build(DenseMethod, parted, initialise=False), resume="latest", progress=False)
    expected = load_file(tmp_path / "full" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "parted" / "model" / "model.safetensors")
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in expected.items())
    assert untimed_rows(tmp_path / "parted") == untimed_rows(tmp_path / "full")  # one final eval row


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
    with pytest.raises(
        SemisparseError, match=r"not finite for 3 steps.*step-00000004.*`allow_schedule_change`"
    ):
        run(config, method, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4]


def run_files(out):
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_overwrite_replaces_the_old_run_only_at_the_new_runs_first_checkpoint(setup):
    tmp_path, model, corpus = setup
    out = tmp_path / "run"
    config = tiny_config(model, out, corpus, steps=4, eval_windows=0)
    run(config, build(DenseMethod, config), progress=False)
    old = run_files(out)

    # Runs that fail or are aborted before their first checkpoint leave the old run as it was.
    failing = tiny_config(model, out, corpus, steps=4, eval_windows=0, checkpoint_every=2, max_bad_steps=1)
    with pytest.raises(
        SemisparseError, match=r"no checkpoint yet: start over \(`overwrite`\) with a lower `lr`"
    ):
        run(failing, build(NaNDense, failing, nan_steps=frozenset({0})), overwrite=True, progress=False)
    assert run_files(out) == old
    with pytest.raises(
        TrainingInterrupted, match=r"no checkpoint was written; the previous run in .* is unchanged"
    ):
        run(config, build(DoublyInterruptedDense, config, stop_after=1), overwrite=True, progress=False)
    assert run_files(out) == old
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # From its first checkpoint on, the new run is the run in OUT (and can be resumed there).
    with pytest.raises(SemisparseError, match=r"step-00000002; continue from it with `resume`"):
        run(failing, build(NaNDense, failing, nan_steps=frozenset({2})), overwrite=True, progress=False)
    assert [step for step, _ in list_checkpoints(out)] == [2] and not (out / "model").exists()
    assert [row["step"] for row in untimed_rows(out)] == [1, 2, 3]
    run(failing, build(DenseMethod, failing, initialise=False), resume="latest", progress=False)
    assert (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_checkpoints_and_token_caches_get_the_usual_permissions(setup, isolated_cache):  # noqa: F811
    """mkdtemp/mkstemp make private 0700/0600 entries; a run's files should read like any other output."""
    tmp_path, model, corpus = setup
    old = os.umask(0o022)
    try:
        config = tiny_config(model, tmp_path / "run", corpus, steps=2, eval_windows=0, checkpoint_every=1)
        run(config, build(DenseMethod, config), progress=False)
    finally:
        os.umask(old)
    (_, final), *_ = reversed(list_checkpoints(tmp_path / "run"))
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert {stat.S_IMODE(path.stat().st_mode) for path in final.iterdir()} == {0o644}
    cached = [path for path in isolated_cache.rglob("*") if path.is_file()]
    assert cached and {stat.S_IMODE(path.stat().st_mode) for path in cached} == {0o644}
