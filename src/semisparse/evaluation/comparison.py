"""The comparison report: perplexity and zero-shot accuracy of several models side by side.

The first model is the reference (usually the dense one): the table gives each model's perplexity, each
task's acc (and acc_norm where the task defines it), the mean acc over the tasks, and the gap of perplexity
and mean to the reference. The report also carries what makes two runs comparable: every data file with
its sha256, the number of examples, the seed, and each model's `semisparse.json` provenance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semisparse.export import atomic_directory

REPORT_FORMAT = 1
METRICS_LOG = "metrics.jsonl"
REPORT_FILES = ("report.json", "report.md", "report.png")


def training_curve(model_dir: str | Path) -> list[dict[str, float]]:
    """Eval-step points `{tokens, eval_ppl}` of a training run's `metrics.jsonl` in a model directory.

    The log is written line by line while training runs, so a missing file gives no points and a line that
    is cut off, or lacks either field, is skipped rather than failing the report.
    """
    path = Path(model_dir).expanduser() / METRICS_LOG
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        tokens, ppl = row.get("tokens"), row.get("eval_ppl")
        if _is_number(tokens) and _is_number(ppl):
            points.append({"tokens": float(tokens), "eval_ppl": float(ppl)})
    return points


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _gap(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def comparison_rows(models: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One table row per model: perplexity, `<task>/acc`, `<task>/acc_norm`, mean acc, gaps to the first.

    Each model dict has `model`, optional `provenance`, `perplexity` (a row of `evaluate_perplexity`) and
    `zeroshot` (task -> {"metrics": {...}}). Accuracies are fractions; gaps are differences (model − first),
    and the perplexity ratio is model / first.
    """
    rows = []
    for entry in models:
        meta = entry.get("provenance") or {}
        ppl_row = entry.get("perplexity") or {}
        scores = entry.get("zeroshot") or {}
        row: dict[str, Any] = {
            "model": entry["model"],
            "method": meta.get("method", "dense"),
            "pattern": meta.get("pattern"),
            "perplexity": ppl_row.get("perplexity"),
        }
        accs = []
        for task in tasks:
            metrics = scores.get(task, {}).get("metrics", {})
            row[f"{task}/acc"] = metrics.get("acc")
            if "acc_norm" in metrics:
                row[f"{task}/acc_norm"] = metrics["acc_norm"]
            if metrics.get("acc") is not None:
                accs.append(metrics["acc"])
        row["mean_acc"] = _mean(accs) if len(accs) == len(tasks) else None
        rows.append(row)
    norm_tasks = {key for row in rows for key in row if key.endswith("/acc_norm")}
    for row in rows:
        for key in norm_tasks:
            row.setdefault(key, None)
        row["perplexity_gap"] = _gap(row["perplexity"], rows[0]["perplexity"])
        row["perplexity_ratio"] = _ratio(row["perplexity"], rows[0]["perplexity"])
        row["mean_acc_gap"] = _gap(row["mean_acc"], rows[0]["mean_acc"])
    return rows


def table_columns(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[str]:
    """Column keys in display order; columns that no model has a value for are left out."""
    keys = ["perplexity", "perplexity_gap", "perplexity_ratio"]
    for task in tasks:
        keys += [f"{task}/acc", f"{task}/acc_norm"]
    keys += ["mean_acc", "mean_acc_gap"]
    return [key for key in keys if any(row.get(key) is not None for row in rows)]


def _header(key: str) -> str:
    names = {
        "perplexity": "ppl",
        "perplexity_gap": "Δppl",
        "perplexity_ratio": "×ppl",
        "mean_acc": "mean",
        "mean_acc_gap": "Δmean",
    }
    if key in names:
        return names[key]
    task, _, metric = key.partition("/")
    return task if metric == "acc" else f"{task} (norm)"


def _cell(key: str, value: Any) -> str:
    """Perplexity with two decimals, accuracies in percent with one (gaps signed)."""
    if value is None:
        return "–"
    if key.startswith("perplexity"):
        return f"{value:+.2f}" if key.endswith("_gap") else f"{value:.2f}"
    return f"{100 * value:+.1f}" if key.endswith("_gap") else f"{100 * value:.1f}"


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    """The comparison table as aligned text (terminal) or a Markdown table."""
    rows, tasks = report["table"], report["settings"]["tasks"]
    columns = table_columns(rows, tasks)
    header = ["model", "method", "pattern", *(_header(key) for key in columns)]
    body = [
        [row["model"], row["method"], row["pattern"] or "-", *(_cell(key, row.get(key)) for key in columns)]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    aligned = [
        [cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        for line in [header, *body]
    ]
    return "\n".join(" ".join(line).rstrip() for line in aligned)


def build_report(models: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The whole report as one JSON-able dict: settings, data provenance, per-model results, table.

    `settings` must hold `tasks`; the data section collects the task data records (file, sha256, split,
    n examples) and the perplexity text's source from the models' results.
    """
    tasks = list(settings["tasks"])
    data: dict[str, Any] = {"tasks": {}, "perplexity": None}
    for entry in models:
        for task, score in (entry.get("zeroshot") or {}).items():
            record = data["tasks"].setdefault(task, dict(score["data"]))
            record["n_examples"] = score["n_examples"]
        ppl_row = entry.get("perplexity")
        if ppl_row and data["perplexity"] is None:
            data["perplexity"] = {
                key: ppl_row[key]
                for key in ("dataset", "split", "file", "sha256", "seqlen", "windows", "total_windows")
                if key in ppl_row
            }
    return {
        "semisparse_report": REPORT_FORMAT,
        "settings": {**settings, "tasks": tasks},
        "data": data,
        "table": comparison_rows(models, tasks),
        "models": list(models),
    }


def _markdown(report: dict[str, Any]) -> str:
    settings, data = report["settings"], report["data"]
    lines = ["# semisparse comparison", ""]
    limit = settings.get("limit")
    scope = f"first {limit} examples per task (a quick look)" if limit else "full evaluation sets"
    lines += [
        f"- zero-shot: lm-evaluation-harness {settings.get('lm_eval_version', '?')}, {scope}, "
        f"seed {settings.get('seed')}, batch size {settings.get('batch_size')}",
        f"- device: {settings.get('device')}, dtype {settings.get('dtype')}",
        "- accuracies in percent; mean = mean acc over the tasks; Δ = model − first model; ×ppl = ratio",
        "",
        format_table(report, markdown=True),
        "",
        "## Data",
        "",
    ]
    ppl = data.get("perplexity")
    if ppl:
        where = ppl.get("file") or ppl.get("dataset")
        lines.append(
            f"- perplexity: {ppl.get('dataset')} ({where}, sha256 `{ppl.get('sha256', '-')}`), "
            f"{ppl.get('windows')} of {ppl.get('total_windows')} windows of {ppl.get('seqlen')} tokens"
        )
    if data["tasks"]:
        lines += ["", "| task | source | file | sha256 | split | examples |", "|---|---|---|---|---|---:|"]
        for task, record in data["tasks"].items():
            file = record.get("file") or record.get("dataset")
            digest = record.get("sha256") or f"fingerprint {record.get('fingerprint')}"
            lines.append(
                f"| {task} | {record['source']} | {file} | `{digest}` | {record['split']} "
                f"| {record['n_examples']} of {record['n_total']} |"
            )
    lines += ["", "## Models", ""]
    for entry in report["models"]:
        meta = entry.get("provenance")
        if meta is None:
            lines.append(f"- `{entry['model']}`: no semisparse.json (not written by semisparse)")
            continue
        summary = ", ".join(
            f"{key} {meta[key]}" for key in ("base_model", "method", "pattern", "created") if meta.get(key)
        )
        lines += [
            f"- `{entry['model']}`: {summary}",
            "",
            "  <details><summary>semisparse.json</summary>",
            "",
            "  ```json",
            *("  " + line for line in json.dumps(meta, indent=2).splitlines()),
            "  ```",
            "",
            "  </details>",
        ]
    return "\n".join(lines) + "\n"


def _chart(report: dict[str, Any], path: Path) -> None:
    """Accuracy per task per model (perplexity per model when no task ran), plus the training curves."""
    from matplotlib.figure import Figure

    rows, tasks = report["table"], report["settings"]["tasks"]
    curves = [(entry["model"], entry.get("training_curve") or []) for entry in report["models"]]
    curves = [(model, points) for model, points in curves if points]
    figure = Figure(figsize=(max(6.0, 1.1 * (len(tasks) + 1) + 2), 4.5 * (1 + bool(curves))))
    axes = figure.subplots(1 + bool(curves), 1, squeeze=False)[:, 0]
    bars = axes[0]
    if tasks:
        labels = [*tasks, "mean"]
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            values = [row.get(f"{task}/acc") for task in tasks] + [row.get("mean_acc")]
            heights = [100 * v if v is not None else 0.0 for v in values]
            bars.bar([x + i * width for x in range(len(labels))], heights, width, label=row["model"])
        bars.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
        bars.set_ylabel("zero-shot acc (%)")
        bars.set_title("accuracy per task")
    else:
        names = [row["model"] for row in rows]
        bars.bar(range(len(rows)), [row.get("perplexity") or 0.0 for row in rows])
        bars.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        bars.set_ylabel("perplexity")
        bars.set_title("perplexity per model")
    if len(rows) > 1 and tasks:
        bars.legend(fontsize="small")
    if curves:
        line = axes[1]
        for model, points in curves:
            line.plot([p["tokens"] for p in points], [p["eval_ppl"] for p in points], marker=".", label=model)
        line.set_xlabel("training tokens")
        line.set_ylabel("eval perplexity")
        line.set_yscale("log")
        line.set_title("perplexity vs tokens")
        line.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def write_report(report: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write report.json, report.md and report.png into `out`, atomically."""
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(_markdown(report))
        _chart(report, tmp / "report.png")
    return Path(out).expanduser()
