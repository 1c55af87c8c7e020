"""Zero-shot evaluation through lm-evaluation-harness on the local data mirror, with tiny random models.

The harness is run for real (its prompts and metrics); only the data location and the model are ours.
Tasks that the mirror holds are checked against the mirror's pinned SHA256SUMS, so a silent fallback to
the Hub (or to another file) would fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from torch import nn

from semisparse.cli import main
from semisparse.data import data_dir
from semisparse.errors import SemisparseError
from semisparse.evaluation import zeroshot
from semisparse.evaluation.zeroshot import TASKS, evaluate_zeroshot, load_tasks, mirrored_tasks, parse_tasks
from semisparse.export import provenance, save_model_dir
from semisparse.jobs.evaluate import evaluate_models

LIMIT = 3
MIRROR = data_dir()
needs_mirror = pytest.mark.skipif(MIRROR is None, reason="the local data mirror is not available")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning makes them crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub access: `datasets` and `huggingface_hub` refuse to reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def mirrored() -> zeroshot.ZeroShotTasks:
    return load_tasks(mirrored_tasks())


def _pinned_hashes() -> dict[str, str]:
    lines = (MIRROR / "SHA256SUMS").read_text().splitlines()
    return {name.removeprefix("./"): digest for digest, name in (line.split() for line in lines if line)}


def test_parse_tasks() -> None:
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks(" rte, boolq ,rte") == ["rte", "boolq"]
    assert parse_tasks("piqa,all") == ["piqa", *(task for task in TASKS if task != "piqa")]
    assert parse_tasks(None) == []


def test_parse_tasks_takes_any_harness_task() -> None:
    # Outside the nine: a task of the fast index's folders, then tasks only the full registry knows.
    assert parse_tasks("rte,lambada_standard") == ["rte", "lambada_standard"]
    assert parse_tasks(["sciq", "copa", "social_iqa"]) == ["sciq", "copa", "social_iqa"]
    # A tag is a plain list of tasks in the harness too (the arc folder's tag, and one spanning folders).
    assert parse_tasks("ai2_arc") == ["arc_challenge", "arc_easy"]
    assert {"boolq", "copa", "wic"} <= set(parse_tasks("super-glue-lm-eval-v1"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # siqa/ of the harness defines `social_iqa`: found by its folder, next to the close spellings
        ("boolq,siqa", "unknown task 'siqa' in `tasks` (closest: social_iqa, sciq"),
        ("hellaswgg", "unknown task 'hellaswgg' in `tasks` (closest: hellaswag"),
        ("nonesuch_xyz", "unknown task 'nonesuch_xyz' in `tasks` (no harness task has a close name)"),
        ("mmlu", "'mmlu' in `tasks` is an lm-evaluation-harness group of 57 tasks (mmlu_abstract_algebra"),
    ],
)
def test_unknown_task_or_group_is_one_line(spec: str, expected: str) -> None:
    with pytest.raises(SemisparseError) as caught:
        parse_tasks(spec)
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("limit", "batch_size", "flag"), [(0, 1, "`limit`=0"), (None, 0, "`batch_size`=0")])
def test_bad_limit_or_batch_size(limit, batch_size, flag) -> None:
    with pytest.raises(SemisparseError, match=flag):
        evaluate_zeroshot(make_tiny_model("llama"), make_tiny_tokenizer(), ["rte"], limit, batch_size)


@needs_mirror
def test_every_mirrored_task_reads_the_mirror_file(mirrored: zeroshot.ZeroShotTasks) -> None:
    # The tasks whose files the mirror holds (its README); BoolQ's broken file was removed from it.
    assert set(mirrored.tasks) == {"rte", "hellaswag", "winogrande", "arc_easy", "piqa", "lambada_openai"}
    pinned = _pinned_hashes()
    for name, data in mirrored.data.items():
        assert data.source == "mirror", name
        assert data.sha256 == pinned[data.file], name
        expected_rows = sum(1 for line in (MIRROR / data.file).open() if line.strip())
        assert data.n_total == expected_rows == len(mirrored.tasks[name].eval_docs), name


@needs_mirror
def test_every_mirrored_task_produces_a_score(mirrored: zeroshot.ZeroShotTasks) -> None:
    scores = evaluate_zeroshot(make_tiny_model("llama"), make_tiny_tokenizer(), mirrored, limit=LIMIT)
    assert [score.task for score in scores] == list(mirrored.tasks)
    with_norm = {"hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"}
    for score in scores:
        assert score.n_examples == LIMIT
        assert score.data is mirrored.data[score.task]
        # acc is a mean over LIMIT examples of 0/1 outcomes
        assert round(score.metrics["acc"] * LIMIT, 6) in range(LIMIT + 1), score
        assert ("acc_norm" in score.metrics) == (score.task in with_norm), score
    lambada = next(score for score in scores if score.task == "lambada_openai")
    assert lambada.metrics["perplexity"] > 1


def test_tasks_read_a_mirror_of_our_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline) -> None:
    rows = [
        {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
        {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0},
    ]
    folder = tmp_path / "aps" / "super_glue" / "boolq"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path))
    built = load_tasks(["boolq"])
    data = built.data["boolq"]
    assert (data.file, data.n_total, data.split) == ("aps/super_glue/boolq/validation.jsonl", 2, "validation")
    assert [doc["question"] for doc in built.tasks["boolq"].eval_docs] == [r["question"] for r in rows]
    [score] = evaluate_zeroshot(make_tiny_model("llama"), make_tiny_tokenizer(), built)
    assert score.n_examples == 2


def test_progress_false_keeps_the_harness_bars_off_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], offline
) -> None:
    rows = [{"question": "is fire cold", "passage": "Fire is hot.", "idx": 0, "label": 0}]
    folder = tmp_path / "aps" / "super_glue" / "boolq"
    folder.mkdir(parents=True)
    (folder / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path))
    built = load_tasks(["boolq"])
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    capfd.readouterr()
    evaluate_zeroshot(model, tokenizer, built, progress=False)
    assert "it/s" not in capfd.readouterr().err
    evaluate_zeroshot(model, tokenizer, built, progress=True)
    assert "it/s" in capfd.readouterr().err


def test_missing_task_file_offline_is_one_clear_line(tmp_path: Path, monkeypatch, offline) -> None:
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path))
    with pytest.raises(SemisparseError) as caught:
        load_tasks(["rte"])
    message = str(caught.value)
    assert "'rte'" in message and str(tmp_path / "nyu-mll/glue/rte/validation.jsonl") in message
    assert "\n" not in message

    model_dir = tmp_path / "model"
    save_model_dir(make_tiny_model("llama"), make_tiny_tokenizer(), model_dir, provenance(method="dense"))
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--ppl", "none", "--tasks", "rte", "--quiet"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: data of task 'rte'")


class MaskedLinear(nn.Module):
    """A stand-in for a custom sparse layer: keeps the dense weight and multiplies by a mask in forward."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("mask", torch.rand_like(linear.weight) > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


@needs_mirror
def test_same_scores_from_object_and_saved_directory(tmp_path: Path, mirrored) -> None:
    tasks = zeroshot.ZeroShotTasks(
        {name: mirrored.tasks[name] for name in ("winogrande", "lambada_openai")},
        {name: mirrored.data[name] for name in ("winogrande", "lambada_openai")},
    )
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    torch.manual_seed(0)
    for name, module in list(model.named_modules()):
        if name.endswith("mlp.up_proj"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            parent.up_proj = MaskedLinear(module)
    model.train()
    from_object = evaluate_zeroshot(model, tokenizer, tasks, limit=LIMIT)
    assert model.training, "the model must come back in the mode it was passed in"

    # The same function as plain Linear layers holding W * mask, saved and loaded back by the CLI's job.
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedLinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            plain = nn.Linear(module.weight.shape[1], module.weight.shape[0], bias=False)
            plain.weight = nn.Parameter((module.weight * module.mask).detach())
            parent.up_proj = plain
    save_model_dir(model.eval(), tokenizer, tmp_path / "saved", provenance(method="test"))
    report = evaluate_models([str(tmp_path / "saved")], ppl=None, tasks=list(tasks.tasks), limit=LIMIT)
    from_directory = report["models"][0]["zeroshot"]
    assert {s.task: s.metrics for s in from_object} == {t: s["metrics"] for t, s in from_directory.items()}

    other = evaluate_zeroshot(make_tiny_model("llama", seed=1), tokenizer, tasks, limit=LIMIT)
    assert other[1].metrics["perplexity"] != from_object[1].metrics["perplexity"]


# --- Tasks outside the fast index, BoolQ without a mirror file, --quiet with mirror files ---

COPA_ROWS = [
    {
        "premise": "The man broke his toe.",
        "choice1": "He dropped a hammer on his foot.",
        "choice2": "He got a hole in his sock.",
        "question": "cause",
        "idx": 0,
        "label": 0,
    },
    {
        "premise": "I tipped the bottle.",
        "choice1": "The liquid in the bottle froze.",
        "choice2": "The liquid in the bottle poured out.",
        "question": "effect",
        "idx": 1,
        "label": 1,
    },
    {
        "premise": "The sun rose.",
        "choice1": "The night began.",
        "choice2": "The day began.",
        "question": "effect",
        "idx": 2,
        "label": 1,
    },
]
BOOLQ_ROWS = [
    {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
    {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0},
]


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline) -> Path:
    """An empty data mirror of our own, offline, and a fresh `datasets` cache (so mirror files are read anew
    and their "Generating ... split" bars show up every run)."""
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(root))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    return root


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    save_model_dir(make_tiny_model("llama"), make_tiny_tokenizer(), model_dir, provenance(method="dense"))
    return model_dir


def _place(root: Path, relative: str, rows: list[dict]) -> None:
    path = root / relative
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_task_outside_the_fast_index_reads_the_mirror_quietly(
    mirror: Path, tiny_model_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # copa is not in the fast index: the full registry gives its dataset (aps/super_glue, copa, validation)
    assert "copa" not in zeroshot._task_manager().task_index
    _place(mirror, "aps/super_glue/copa/validation.jsonl", COPA_ROWS)
    assert datasets.is_progress_bar_enabled()
    capfd.readouterr()
    args = ["eval", str(tiny_model_dir), "--ppl", "none", "--tasks", "copa", "--limit", "2", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--report-dir", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    # Neither the harness's bars nor datasets' "Generating validation split" bar, on any stream.
    captured = capfd.readouterr()
    for text in (result.stderr, captured.err, captured.out):
        assert "Generating" not in text and "it/s" not in text
    assert datasets.is_progress_bar_enabled(), "datasets' bars must be switched back on afterwards"
    assert "copa" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    data = report["data"]["tasks"]["copa"]
    assert data["source"] == "mirror" and data["file"] == "aps/super_glue/copa/validation.jsonl"
    assert (data["dataset"], data["split"], data["n_total"], data["n_examples"]) == (
        "aps/super_glue/copa",
        "validation",
        3,
        2,
    )
    score = report["models"][0]["zeroshot"]["copa"]
    assert score["n_examples"] == 2 and round(score["metrics"]["acc"] * 2) in (0, 1, 2)


def test_a_task_outside_the_fast_index_without_data_names_its_file(mirror: Path) -> None:
    # sciq scores its test split; the harness reads allenai/sciq, which is neither mirrored nor reachable.
    with pytest.raises(SemisparseError) as caught:
        load_tasks(["sciq"])
    message = str(caught.value)
    assert message.startswith("data of task 'sciq' is neither in the data mirror nor on the Hub")
    assert message.endswith(f"put its test rows at {mirror / 'allenai/sciq/test.jsonl'}")
    assert "\n" not in message


def test_boolq_reads_the_hub_or_a_file_placed_in_the_mirror(
    mirror: Path, tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", str(tiny_model_dir), "--ppl", "none", "--tasks", "boolq", "--limit", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    expected = mirror / "aps/super_glue/boolq/validation.jsonl"
    assert line.startswith("error: data of task 'boolq' is neither in the data mirror nor on the Hub")
    assert line.endswith(f"put its validation rows at {expected}")

    _place(mirror, "aps/super_glue/boolq/validation.jsonl", BOOLQ_ROWS)
    capfd.readouterr()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "boolq" in result.stdout
    # Without --quiet the bars are there (so the --quiet test above is not passing vacuously).
    assert "Generating validation split" in result.stderr + capfd.readouterr().err


def test_a_group_is_refused_in_one_line_naming_the_flag(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--ppl", "none", "--tasks", "mmlu"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: 'mmlu' in --tasks is an lm-evaluation-harness group of 57 tasks")
