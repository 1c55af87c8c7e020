"""The comparison report: table arithmetic on known numbers, the three files, `semisparse eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tiny_tokenizer
from PIL import Image

from semisparse.cli import main
from semisparse.data import data_dir
from semisparse.errors import SemisparseError
from semisparse.evaluation.comparison import (
    build_report,
    comparison_rows,
    format_table,
    training_curve,
    write_report,
)
from semisparse.export import provenance, save_model_dir

TASKS = ["boolq", "hellaswag"]
DATA = {"source": "mirror", "dataset": "x", "split": "validation", "file": "x/validation.jsonl", "n_total": 9}


def _model(name, ppl, boolq, hellaswag, hellaswag_norm, method=None, curve=()):
    scores = {
        "boolq": {"metrics": {"acc": boolq}, "n_examples": 4, "data": {**DATA, "sha256": "aa"}},
        "hellaswag": {
            "metrics": {"acc": hellaswag, "acc_norm": hellaswag_norm},
            "n_examples": 4,
            "data": {**DATA, "sha256": "bb"},
        },
    }
    return {
        "model": name,
        "provenance": provenance(method=method, pattern="2:4") if method else None,
        "perplexity": {
            "perplexity": ppl,
            "dataset": "wikitext2",
            "windows": 2,
            "total_windows": 5,
            "seqlen": 8,
        },
        "zeroshot": scores,
        "training_curve": list(curve),
    }


@pytest.fixture
def report():
    models = [
        _model("dense", 10.0, 0.75, 0.50, 0.25),
        _model(
            "sparse", 12.5, 0.50, 0.25, 0.50, method="sparsegpt", curve=[{"tokens": 1.0, "eval_ppl": 20.0}]
        ),
    ]
    return build_report(models, {"tasks": TASKS, "limit": 4, "seed": 1234, "batch_size": 1})


def test_gap_to_the_first_model_on_known_numbers(report) -> None:
    dense, sparse = report["table"]
    assert dense["mean_acc"] == pytest.approx(0.625) and sparse["mean_acc"] == pytest.approx(0.375)
    assert sparse["mean_acc_gap"] == pytest.approx(-0.25) and dense["mean_acc_gap"] == 0
    assert sparse["perplexity_gap"] == pytest.approx(2.5) and dense["perplexity_gap"] == 0
    assert sparse["perplexity_ratio"] == pytest.approx(1.25) and dense["perplexity_ratio"] == 1
    assert sparse["hellaswag/acc_norm"] == 0.5 and "boolq/acc_norm" not in sparse
    assert (dense["method"], sparse["method"], sparse["pattern"]) == ("dense", "sparsegpt", "2:4")


def test_mean_needs_every_task() -> None:
    partial = _model("partial", 11.0, 0.5, 0.5, 0.5)
    del partial["zeroshot"]["boolq"]
    rows = comparison_rows([_model("dense", 10.0, 0.75, 0.5, 0.25), partial], TASKS)
    assert rows[1]["boolq/acc"] is None and rows[1]["mean_acc"] is None and rows[1]["mean_acc_gap"] is None


def test_table_text_and_markdown(report) -> None:
    header, _, sparse = (" ".join(line.split()) for line in format_table(report).splitlines())
    assert header == "model method pattern ppl Δppl ×ppl boolq hellaswag hellaswag (norm) mean Δmean"
    assert sparse == "sparse sparsegpt 2:4 12.50 +2.50 1.25 50.0 25.0 50.0 37.5 -25.0"
    markdown = format_table(report, markdown=True).splitlines()
    assert len(markdown) == 4 and markdown[1].count("|") == markdown[0].count("|")
    assert (
        markdown[3]
        == "| sparse | sparsegpt | 2:4 | 12.50 | +2.50 | 1.25 | 50.0 | 25.0 | 50.0 | 37.5 | -25.0 |"
    )


def test_report_files_are_written_and_well_formed(tmp_path: Path, report) -> None:
    out = write_report(report, tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert format_table(report, markdown=True) in markdown
    assert "`aa`" in markdown and "`bb`" in markdown and "4 of 9" in markdown  # held-out hygiene
    assert "seed 1234" in markdown and '"method": "sparsegpt"' in markdown  # provenance
    with Image.open(out / "report.png") as image:
        image.verify()
        with_curve = image.size
    report["models"][1]["training_curve"] = []
    with Image.open(write_report(report, tmp_path / "again") / "report.png") as image:
        assert image.size[1] < with_curve[1], "the perplexity-vs-tokens panel is drawn only with a curve"
    with pytest.raises(SemisparseError, match="already exists"):
        write_report(report, tmp_path / "report")


def test_training_curve_skips_what_is_not_an_eval_point(tmp_path: Path) -> None:
    assert training_curve(tmp_path) == []
    lines = [
        {"step": 1, "tokens": 100, "loss": 3.0},
        {"step": 2, "tokens": 200, "eval_ppl": 40.5},
        {"tokens": 300, "eval_ppl": float("nan")},
        {"tokens": 400, "eval_ppl": 30},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"tokens": 500, "ev'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert training_curve(tmp_path) == [
        {"tokens": 200.0, "eval_ppl": 40.5},
        {"tokens": 400.0, "eval_ppl": 30.0},
    ]


@pytest.mark.skipif(data_dir() is None, reason="the local data mirror is not available")
def test_eval_command_prints_one_table_and_writes_the_report(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, seed in (("dense", 0), ("sparse", 1)):
            save_model_dir(
                make_tiny_model("llama", seed), make_tiny_tokenizer(), tmp_path / name, provenance()
            )
        text = tmp_path / "eval.txt"
        text.write_text(" ".join(f"evaluation sentence number {i} is here." for i in range(200)))
        args = ["eval", tmp_path / "dense", tmp_path / "sparse", "--ppl", text, "--seqlen", 64]
        args += ["--tasks", "rte,piqa", "--limit", 2, "--report-dir", tmp_path / "report", "--quiet"]
        result = CliRunner().invoke(main, [str(arg) for arg in args])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    table = result.output[result.output.index("model ") :].splitlines()
    assert table[0].split()[3:] == ["ppl", "Δppl", "×ppl", "rte", "piqa", "piqa", "(norm)", "mean", "Δmean"]
    assert [line.split()[0] for line in table[1:3]] == [str(tmp_path / "dense"), str(tmp_path / "sparse")]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["settings"]["tasks"] == ["rte", "piqa"] and saved["settings"]["limit"] == 2
    assert saved["data"]["tasks"]["rte"]["n_examples"] == 2
    assert saved["data"]["perplexity"]["sha256"]
