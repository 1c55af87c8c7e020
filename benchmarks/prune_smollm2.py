"""Prune SmolLM2-135M with each one-shot method and report WikiText-2 perplexity, time and peak memory.

Each method runs in its own `semisparse prune` process, so its peak memory is its own; all outputs are then
evaluated on the same token stream by one `semisparse eval`. Results go to benchmarks/results/ as JSON and
Markdown, with the command and device.

    python benchmarks/prune_smollm2.py                      # papers' protocol, all 148 windows
    python benchmarks/prune_smollm2.py --max-windows 16     # quick CPU look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, device_name, semisparse, window_scope, write_results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", default="runs/bench-prune")
    parser.add_argument("--name", default=None, help="Result file stem (default: prune_smollm2_<device>).")
    args = parser.parse_args()

    work = Path(args.work_dir)
    outputs = []
    for method in args.methods.split(","):
        out = work / f"{method}-{args.pattern.replace(':', 'of')}"
        calibration = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        semisparse("prune", args.model, "--method", method, "--pattern", args.pattern, *calibration,
                   "--device", args.device, "-o", str(out), "--overwrite", "--quiet")  # fmt: skip
        outputs.append(out)

    rows_file = work / "eval.json"
    window_args = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    start = time.perf_counter()
    semisparse(
        "eval",
        args.model,
        *map(str, outputs),
        "--device",
        args.device,
        "--output",
        str(rows_file),
        *window_args,
    )
    eval_seconds = time.perf_counter() - start
    rows = json.loads(rows_file.read_text())
    for row, out in zip(rows[1:], outputs, strict=True):
        meta = json.loads((out / "semisparse.json").read_text())
        row["prune_seconds"] = meta["prune_seconds"]
        row["peak_memory_gib"] = {k: round(v / 2**30, 2) for k, v in meta["peak_memory_bytes"].items()}

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "calibration": f"c4 mirror, {args.nsamples} x {args.seqlen} tokens, seed 0",
        "eval_seconds_all_models": round(eval_seconds, 1),
        "rows": rows,
    }
    stem = args.name or f"prune_smollm2_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    first = rows[0]
    lines = [
        f"# SmolLM2-135M, {args.pattern} one-shot pruning",
        "",
        f"- command: `{record['command']}`",
        f"- device: {record['device']}, {record['date']}",
        f"- calibration: {record['calibration']}",
        f"- perplexity: WikiText-2 test, {window_scope(first)} windows of {first['seqlen']}",
        "",
        "| method | perplexity | × dense | prune time (s) | peak memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        memory = ", ".join(f"{k} {v}" for k, v in row.get("peak_memory_gib", {}).items()) or "-"
        lines.append(
            f"| {row['method']} | {row['perplexity']:.2f} | {row['perplexity'] / first['perplexity']:.2f} "
            f"| {row.get('prune_seconds', '-')} | {memory} |"
        )
    write_results(RESULTS / f"{stem}.json", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
