"""Block-wise reconstruction on SmolLM2-135M: {magnitude, wanda, sparsegpt} x {one-shot, reconstructed
(attn-mlp), reconstructed + learned local masks}, plus `block` and `linear` granularity from SparseGPT.

Every step is a `semisparse` command in its own process (so its peak RSS, read back from the output's
semisparse.json, is its own): `prune` once per method, `reconstruct` from that pruned directory (the same
calibration windows), then `eval` on WikiText-2 and on c4-eval (the C4 shard's last 100 documents, which
calibration never reads). Each row records perplexities, wall time (the one-shot prune plus, for a
reconstructed row, the reconstruction), peak RSS, threads and the 1-minute load average at its start and
end. The JSON + Markdown under benchmarks/results/ are rewritten after every row, and a rerun skips the
rows already there (an interrupted reconstruction continues with --resume), so the table can be filled
over several sessions.

    python benchmarks/reconstruct_smollm2.py                       # the table: 32 x 2048 calibration
    python benchmarks/reconstruct_smollm2.py --rows sparsegpt,sparsegpt+attn-mlp
    python benchmarks/reconstruct_smollm2.py --model gemma3-270m --nsamples 16 --max-windows 16 \
        --rows sparsegpt,sparsegpt+attn-mlp --name reconstruct_gemma3_cpu_16x2048   # the second family
    python benchmarks/reconstruct_smollm2.py --smoke --model DIR --name smoke   # seconds, any tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, device_name, semisparse, write_results

METHODS = ("magnitude", "wanda", "sparsegpt")
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}


def row_plan(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Row name -> what produces it: the one-shot method and, for a reconstructed row, its settings."""
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows[method] = {"method": method, "reconstruct": None}
        rows[f"{method}+attn-mlp"] = {"method": method, "reconstruct": {"granularity": "attn-mlp"}}
        rows[f"{method}+attn-mlp+masks"] = {
            "method": method,
            "reconstruct": {"granularity": "attn-mlp", "learn_mask": True},
        }
        if method == "sparsegpt":
            rows[f"{method}+block"] = {"method": method, "reconstruct": {"granularity": "block"}}
            rows[f"{method}+linear"] = {"method": method, "reconstruct": {"granularity": "linear"}}
    return rows


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def evaluate(model: str, dataset: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Perplexity of one model on one dataset, in its own `semisparse eval` process."""
    rows_file = work / "eval-rows.json"
    window_args = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    seqlen_args = ["--seqlen", str(args.eval_seqlen)] if args.eval_seqlen else []
    semisparse("eval", model, "--ppl", dataset, *window_args, *seqlen_args, "--device", args.device,
               "--output", str(rows_file), "--quiet")  # fmt: skip
    row = json.loads(rows_file.read_text())[0]
    rows_file.unlink()
    return row


def one_shot(method: str, args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The one-shot pruned model (reused when a complete one is already in the work directory)."""
    out = work / f"{method}-{args.pattern.replace(':', 'of')}"
    if not (out / "semisparse.json").is_file():
        semisparse("prune", args.model, "--method", method, "--pattern", args.pattern, *calibration(args),
                   "--device", args.device, "-o", str(out), "--overwrite", "--quiet")  # fmt: skip
    return out, json.loads((out / "semisparse.json").read_text())


def calibration(args: argparse.Namespace) -> list[str]:
    return ["--calibration", args.calibration, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--seed", str(args.seed)]  # fmt: skip


def run_row(name: str, plan: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S"), load_average()
    pruned, prune_meta = one_shot(plan["method"], args, work)
    row: dict[str, Any] = {"row": name, "method": plan["method"], "started": started}
    model, meta = pruned, prune_meta
    seconds = prune_meta["prune_seconds"]
    if plan["reconstruct"] is not None:
        out = work / name.replace("+", "-")
        settings = {**plan["reconstruct"], **args.settings}
        flags = [f"--set={key}={value}" for key, value in settings.items()]
        began = time.perf_counter()
        semisparse("reconstruct", args.model, str(pruned), "-o", str(out), *calibration(args), *flags,
                   "--device", args.device, "--resume", "--quiet")  # fmt: skip
        row["reconstruct_wall_seconds"] = round(time.perf_counter() - began, 1)
        meta = json.loads((out / "semisparse.json").read_text())
        model = out
        seconds += meta["reconstruct_seconds"]
        row.update(
            granularity=meta["settings"]["granularity"],
            learn_mask=meta["settings"]["learn_mask"],
            block_loss_before=meta["block_loss_before"],
            block_loss_after=meta["block_loss_after"],
            mask_changed=meta["mask_changed"],
            reconstruct_seconds=meta["reconstruct_seconds"],
            settings={
                key: meta["settings"].get(key)
                for key in ("epochs", "batch_size", "lr", "inputs", "mask_lr", "mask_layers", "autocast")
            },
        )
    row["prune_seconds"] = prune_meta["prune_seconds"]
    row["seconds"] = round(seconds, 1)
    row["peak_rss_gib"] = round(
        max(prune_meta["peak_memory_bytes"]["process_rss"], meta["peak_memory_bytes"]["process_rss"]) / 2**30,
        2,
    )
    if "cuda_allocated" in meta["peak_memory_bytes"]:
        row["peak_cuda_gib"] = round(meta["peak_memory_bytes"]["cuda_allocated"] / 2**30, 2)
    for dataset, key in (("wikitext2", "wikitext2"), ("c4-eval", "c4_eval")):
        result = evaluate(str(model), dataset, args, work)
        row[f"{key}_ppl"] = result["perplexity"]
        row[f"{key}_windows"] = f"{result['windows']} of {result['total_windows']} x {result['seqlen']}"
    row["threads"] = args.threads
    row["load_average_1m"] = [load_start, load_average()]
    return row


def markdown(record: dict[str, Any]) -> str:
    rows = record["rows"]
    dense = record.get("dense") or {}
    lines = [
        f"# {MODEL_NAMES.get(record['model'], record['model'])} {record['pattern']}: one-shot vs block-wise "
        "reconstruction",
        "",
        f"- command: `{record['command']}`",
        f"- device: {record['device']}; threads per process: {record['threads']}",
        f"- calibration: {record['calibration']}",
        f"- perplexity: WikiText-2 test and c4-eval, {record['eval']}",
        f"- dense: WikiText-2 {dense.get('wikitext2_ppl', float('nan')):.2f}, "
        f"c4-eval {dense.get('c4_eval_ppl', float('nan')):.2f}",
        "- time: one-shot prune plus reconstruction; peak RSS: the larger of the two processes;",
        "  load: 1-minute load average at the row's start and end (the machine is shared)",
        "",
        "| row | WikiText-2 | c4-eval | block loss before → after | mask changed | time (s) "
        "| peak RSS (GiB) | threads | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in record["order"]:
        row = rows.get(name)
        if row is None:
            continue
        loss = (
            f"{row['block_loss_before']:.4f} → {row['block_loss_after']:.4f}"
            if "block_loss_after" in row
            else "-"
        )
        changed = f"{row['mask_changed']:.2%}" if row.get("mask_changed") is not None else "-"
        load = " → ".join(f"{value:.1f}" for value in row["load_average_1m"])
        lines.append(
            f"| {name} | {row['wikitext2_ppl']:.2f} | {row['c4_eval_ppl']:.2f} | {loss} | {changed} "
            f"| {row['seconds']} | {row['peak_rss_gib']} | {row['threads']} | {load} |"
        )
    carried = [f"- `{name}` was measured for {row['carried_from']}" for name, row in rows.items()
               if "carried_from" in row]  # fmt: skip
    if "carried_from" in dense:
        carried.insert(0, f"- dense was measured for {dense['carried_from']}")
    return "\n".join([*lines, *([""] if carried else []), *carried]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rows", default=None, help="Only these rows (comma list), e.g. sparsegpt+block.")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--nsamples", type=int, default=32, help="Calibration windows (prune + reconstruct).")
    parser.add_argument("--seqlen", type=int, default=2048, help="Tokens per calibration window.")
    parser.add_argument("--seed", type=int, default=0, help="Calibration seed (prune + reconstruct).")
    parser.add_argument("--max-windows", type=int, default=32, help="Perplexity on the first K windows.")
    parser.add_argument("--eval-seqlen", type=int, default=None, help="Perplexity window (default 2048).")
    parser.add_argument(
        "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
        help="A reconstruct setting for every reconstructed row (repeatable), e.g. epochs=2.",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each command.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", default="runs/bench-reconstruct")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes: checks the script, not the method.")
    parser.add_argument(
        "--name", default=None, help="Result file stem (default reconstruct_smollm2_<device>)."
    )
    args = parser.parse_args()
    if args.smoke:
        args.nsamples, args.seqlen, args.max_windows = 4, 64, 2
        args.eval_seqlen = args.eval_seqlen or 64
        args.assignments = ["epochs=1", *args.assignments]
    args.settings = dict(item.split("=", 1) for item in args.assignments)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)  # so the record's machine line names the commands' threads
    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())

    plan = row_plan([method for method in args.methods.split(",") if method])
    wanted = args.rows.split(",") if args.rows else list(plan)
    unknown = [name for name in wanted if name not in plan]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(plan)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"reconstruct_smollm2_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    json_path = RESULTS / f"{stem}.json"
    record: dict[str, Any] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    record.pop("machine", None)  # the load of this invocation, not of the one that wrote the first rows
    scope = f"first {args.max_windows} windows" if args.max_windows else "all windows"
    settings = {
        "pattern": args.pattern,
        "calibration": f"{args.calibration}, {args.nsamples} x {args.seqlen} tokens, seed {args.seed}",
        "eval": f"{scope} of {args.eval_seqlen or 'min(2048, context)'} tokens",
        "reconstruct_settings": args.settings,
    }
    if record and any(record.get(key) != value for key, value in settings.items()):
        sys.exit(f"{json_path} holds rows of another setup ({settings}): pass another --name")
    record.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=device_name(args.device),
        threads=args.threads,
        model=args.model,
        order=list(plan),
        **settings,
    )
    record.setdefault("rows", {})
    if "dense" not in record:
        dense = {"load_average_1m_at_start": load_average()}
        for dataset, key in (("wikitext2", "wikitext2"), ("c4-eval", "c4_eval")):
            dense[f"{key}_ppl"] = evaluate(args.model, dataset, args, work)["perplexity"]
        record["dense"] = dense
        write_results(json_path, record, markdown(record))
    for name in wanted:
        if name in record["rows"]:
            print(f"{name}: done before, skipped")
            continue
        print(f"{name}: running", flush=True)
        record["rows"][name] = run_row(name, plan[name], args, work)
        record["date"] = time.strftime("%Y-%m-%d")
        write_results(json_path, record, markdown(record))
    table = markdown(record)
    print(table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
