"""Zero-shot accuracy and WikiText-2 perplexity of dense SmolLM2-135M versus its 2:4 versions.

Runs `semisparse.jobs.evaluate.evaluate_models` (what `semisparse eval` runs) on every task of the local
data mirror and records the numbers, the command, the device and the protocol under benchmarks/results/.
The default sparse model is the output of `make demo`, created with the same command when missing; `--sparse`
takes a comma list of saved sparse models (e.g. a SparseGPT start and its reconstruction).

    python benchmarks/zeroshot_smollm2.py                    # full sets (use a GPU)
    python benchmarks/zeroshot_smollm2.py --limit 100        # quick CPU look: first 100 examples per task
    python benchmarks/zeroshot_smollm2.py --render benchmarks/results/zeroshot_smollm2_cpu.json  # tables only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, device_name, semisparse, write_results

from semisparse.evaluation.comparison import build_report, format_table, write_report
from semisparse.evaluation.zeroshot import mirrored_tasks
from semisparse.jobs.evaluate import evaluate_models

PRUNE = ["--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "32", "--seqlen", "1024"]
DEMO = "runs/demo-sparsegpt-2of4"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparse", default=DEMO, help="Sparse model directories (comma list).")
    parser.add_argument("--limit", type=int, default=None, help="First N examples per task (default: all).")
    parser.add_argument("--max-windows", type=int, default=None, help="WikiText-2 windows (default: all).")
    parser.add_argument("--skip", default="", help="Comma list of mirrored tasks to leave out.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None, help="Result file stem (default: zeroshot_smollm2_<device>).")
    parser.add_argument("--render", default=None, help="Only re-render the tables of a saved result JSON.")
    args = parser.parse_args()
    stem = args.name or f"zeroshot_smollm2_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    if args.render:
        record = json.loads(Path(args.render).read_text())
        record["report"] = build_report(record["report"]["models"], record["report"]["settings"])
        write_outputs(record, Path(args.render).stem)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    sparse = [Path(path) for path in args.sparse.split(",") if path]
    if args.sparse == DEMO and not (sparse[0] / "config.json").is_file():
        semisparse("prune", args.model, *PRUNE, "-o", DEMO, "--device", args.device, "--quiet")
    missing = [str(path) for path in sparse if not (path / "config.json").is_file()]
    if missing:
        sys.exit(f"error: not a saved model: {', '.join(missing)}; run `semisparse prune` first")

    start = time.perf_counter()
    report = evaluate_models(
        [args.model, *map(str, sparse)],
        ppl="wikitext2",
        tasks=[task for task in mirrored_tasks() if task not in args.skip.split(",")],
        limit=args.limit,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        device=args.device,
        progress=False,
    )
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "sparse": {str(path): provenance(path) for path in sparse},
        "limit": args.limit,
        "skipped": [task for task in args.skip.split(",") if task],
        "seconds_all_models": round(time.perf_counter() - start, 1),
        "report": report,
    }
    write_outputs(record, stem)


def write_outputs(record: dict, stem: str) -> None:
    """The record as JSON, the full report (Markdown, chart) beside it, and the README table."""
    report = record["report"]
    write_report(report, RESULTS / f"{stem}_report", overwrite=True)
    ppl = report["data"]["perplexity"]
    limit = record["limit"]
    scope = f"first {limit} examples of each task" if limit else "full evaluation sets"
    lines = [
        "# SmolLM2-135M: dense vs 2:4, zero-shot (lm-evaluation-harness) and WikiText-2 perplexity",
        "",
        f"- command: `{record['command']}`",
        f"- device: {record['device']}, {record['date']}; {record['seconds_all_models']} s for all models",
        f"- zero-shot: {scope}, 0-shot, seed {report['settings']['seed']}, "
        f"lm-eval {report['settings']['lm_eval_version']}; left out: tasks not in the data mirror"
        + "".join(f", {task} (--skip)" for task in record.get("skipped", [])),
        f"- perplexity: WikiText-2 test, {ppl['windows']} of {ppl['total_windows']} windows "
        f"of {ppl['seqlen']} tokens",
        *sparse_lines(record),
        "- accuracies in percent; mean = mean acc over the tasks; Δ = model − dense; ×ppl = ratio to dense; "
        f"each accuracy's standard error is up to {100 * _largest_stderr(report):.1f} points",
        "",
        format_table(report, markdown=True),
        "",
        f"Data files, hashes and provenance: `{stem}_report/report.md`.",
    ]
    write_results(RESULTS / f"{stem}.json", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


def provenance(model: Path) -> str:
    """The command that made a saved model, from its semisparse.json (paths shortened to their names)."""
    meta = json.loads((model / "semisparse.json").read_text())
    command = meta.get("command") or []
    return " ".join(["semisparse", *map(_short_argument, command[1:])])


def _short_argument(part: str) -> str:
    """A path argument by its name, keeping a `KEY=` prefix (`init=/runs/x/pruned` -> `init=pruned`)."""
    key, equals, value = part.partition("=") if "=" in part.split("/")[0] else ("", "", part)
    return f"{key}{equals}{Path(value).name}" if "/" in value else part


def sparse_lines(record: dict) -> list[str]:
    """One line per sparse model; records before several models were allowed hold just the demo path."""
    if isinstance(record["sparse"], str):
        command = f"semisparse prune {record['model']} {' '.join(PRUNE)}"
        return [f"- sparse model: `{record['sparse']}` (`{command}`)"]
    return [f"- sparse model: `{path}` (`{command}`)" for path, command in record["sparse"].items()]


def _largest_stderr(report: dict) -> float:
    return max(
        value
        for entry in report["models"]
        for score in entry.get("zeroshot", {}).values()
        for key, value in score["metrics"].items()
        if key in ("acc_stderr", "acc_norm_stderr")
    )


if __name__ == "__main__":
    main()
