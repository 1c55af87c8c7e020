"""Retrain 2:4 SmolLM2-135M with AST and MaskLLM variants at one budget; compare with the one-shot start.

Every variant starts from the same one-shot 2:4 model (`--init-method`, SparseGPT by default, pruned into
`--init-dir` first if absent; AST from magnitude prunes the dense model itself, so its pruned weights keep
their dense values and can grow back, as in the paper), trains in its own `semisparse train` process on the
Wikipedia sample, and is then evaluated with the dense model and the one-shot starting point on the same
WikiText-2 token stream. The perplexity-vs-tokens curve comes from each run's `metrics.jsonl`. Results go
to benchmarks/results/ as JSON and Markdown with the command and device.

Variants: `ast-boosted` (AST with SLoRB, adaptive mask, distillation, annealed SR-STE), `ast-boosted-zeros`
(the same with SLoRB's S starting at zero, so training starts from the one-shot model), `ast` (no SLoRB),
`ast-fixed-mask` (distillation only: the mask and SR-STE off, so against `naive` it isolates distillation),
`naive` (fixed mask, no distillation, no decay: plain retraining of the kept weights), `maskllm` (learned
mask on the frozen dense weights, SparseGPT prior), `maskllm-noprior`, `maskllm-noreg`, `joint` (MaskLLM
that also trains the kept weights with AST's distillation loss, at MaskLLM's default `weight_lr`) and
`joint-ast-lr` (the same with the weights at the AST runs' learning rate, `--lr-ast`).

    python benchmarks/train_smollm2.py --tokens 100M                          # GPU protocol
    python benchmarks/train_smollm2.py --tokens 48k --seq-len 512 --micro-batch 2 --max-windows 16 \\
        --parallel 2 --name train_smollm2_cpu                                 # the ~30-minute CPU version
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, device_name, semisparse, semisparse_command, window_scope, write_results

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ast-boosted": ("ast", ["slorb=true", "slorb_init=mean"]),
    "ast-boosted-zeros": ("ast", ["slorb=true", "slorb_init=zeros"]),
    "ast": ("ast", []),
    "ast-fixed-mask": ("ast", ["mask_update_every=0", "decay_lambda=0"]),
    "naive": ("ast", ["mask_update_every=0", "alpha_task=1", "alpha_kl=0", "decay_lambda=0"]),
    "maskllm": ("maskllm", []),
    "maskllm-noprior": ("maskllm", ["prior=none", "alpha=0"]),
    "maskllm-noreg": ("maskllm", ["reg_start=0"]),
    "joint": ("maskllm", ["train_weights=true", "distill=true"]),
    "joint-ast-lr": ("maskllm", ["train_weights=true", "distill=true"]),  # weight_lr = --lr-ast
}


def train_command(args: argparse.Namespace, name: str, masks_file: Path) -> list[str]:
    method, settings = VARIANTS[name]
    settings = list(settings)
    if method == "ast":
        settings.append(f"init={args.init_dir if args.init_method == 'sparsegpt' else args.init_method}")
    else:
        if name == "joint-ast-lr":
            settings.append(f"weight_lr={args.lr_ast}")  # the weights move as fast as in the AST runs
        if "prior=none" not in settings:
            settings.append(f"prior_mask={masks_file}")
    flags = {
        "--tokens": args.tokens,
        "--seq-len": args.seq_len,
        "--micro-batch": args.micro_batch,
        "--grad-accum": args.grad_accum,
        "--lr": args.lr_ast if method == "ast" else args.lr_maskllm,  # MaskLLM: the logits' lr
        "--eval-every": args.eval_every,
        "--eval-windows": args.curve_windows,
        "--eval-seqlen": args.seq_len,
        "--checkpoint-every": args.checkpoint_every,
        "--device": args.device,
    }
    options = [str(item) for pair in flags.items() for item in pair]
    sets = [item for setting in settings for item in ("--set", setting)]
    return semisparse_command(
        "train", method, args.model, "-o", str(args.work_dir / name), *options, "--quiet", *sets
    )


def run_all(commands: dict[str, list[str]], parallel: int, threads: int, logs: Path) -> dict[str, float]:
    """Run the training commands, `parallel` at a time with `threads` threads each; wall seconds of each."""
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    seconds: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel:
            name, command = pending.pop(0)
            print("$", " ".join(command), flush=True)
            log = (logs / f"{name}.log").open("wb")
            running[name] = (
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                time.time(),
            )
        time.sleep(5)
        for name, (process, start) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {process.returncode}); see {logs / name}.log")
                seconds[name] = time.time() - start
                print(f"done {name} in {seconds[name]:.0f} s", flush=True)
    return seconds


def curve(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"tokens": row["tokens"], "eval_ppl": row["eval_ppl"]} for row in rows if "eval_ppl" in row]


def train_summary(run_dir: Path) -> dict[str, float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [row for row in rows if row.get("kind") == "train"]
    rates = sorted(row["tokens_per_s"] for row in train if row.get("tokens_per_s"))
    memory = [row.get("memory_bytes") or 0 for row in train]
    return {
        "steps": train[-1]["step"] if train else 0,
        "median_tokens_per_s": round(rates[len(rates) // 2], 1) if rates else None,
        "peak_memory_gib": round(max(memory) / 2**30, 2) if memory else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="ast-boosted,naive,maskllm")
    parser.add_argument("--init-method", choices=["sparsegpt", "magnitude"], default="sparsegpt")
    parser.add_argument("--init-dir", type=Path, default=None, help="Default runs/demo-METHOD-2of4.")
    parser.add_argument("--tokens", default="100M")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr-ast", type=float, default=2e-4)
    parser.add_argument("--lr-maskllm", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--curve-windows", type=int, default=8, help="Windows per in-training evaluation.")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--max-windows", type=int, default=None, help="Final evaluation: first K windows.")
    parser.add_argument("--parallel", type=int, default=1, help="Training runs at a time (CPU: split cores).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-train"))
    parser.add_argument("--name", default=None, help="Result file stem (default: train_smollm2_<device>).")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    args.init_dir = args.init_dir or Path(f"runs/demo-{args.init_method}-2of4")

    if not (args.init_dir / "config.json").is_file():
        prune = [
            "--method",
            args.init_method,
            "--pattern",
            "2:4",
            "-o",
            str(args.init_dir),
            "--device",
            args.device,
        ]
        semisparse("prune", args.model, *prune)
    masks_file = args.work_dir / f"{args.init_method}-masks.npz"
    if not masks_file.is_file():
        args.work_dir.mkdir(parents=True, exist_ok=True)
        semisparse("export-mask", str(args.init_dir), "-o", str(masks_file))

    commands = {name: train_command(args, name, masks_file) for name in names}
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    wall = run_all(commands, args.parallel, threads, args.work_dir / "logs")

    from semisparse.jobs.evaluate import evaluate_perplexity

    models = [args.model, str(args.init_dir), *(str(args.work_dir / name / "model") for name in names)]
    rows = evaluate_perplexity(models, max_windows=args.max_windows, device=args.device, progress=False)
    labels = ["dense", f"{args.init_method} one-shot", *names]
    for row, label in zip(rows, labels, strict=True):
        row["variant"] = label
    for row, name in zip(rows[2:], names, strict=True):
        run_dir = args.work_dir / name
        row.update(train_summary(run_dir), train_seconds=round(wall[name], 1), curve=curve(run_dir))

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "budget": {
            "tokens": args.tokens,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "parallel_runs": args.parallel,
            "threads_each": threads,
        },
        "rows": rows,
    }
    stem = args.name or f"train_smollm2_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    first = rows[0]
    lines = [
        f"# SmolLM2-135M, 2:4 retraining at {args.tokens} tokens",
        "",
        f"- command: `{record['command']}`",
        f"- device: {record['device']}, {record['date']}",
        f"- budget: {record['budget']}",
        f"- perplexity: WikiText-2 test, {window_scope(first)} windows of {first['seqlen']}",
        "",
        "| variant | perplexity | × dense | steps | train time (s) | tokens/s | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['perplexity']:.2f} | {row['perplexity'] / first['perplexity']:.2f} "
            f"| {row.get('steps', '-')} | {row.get('train_seconds', '-')} "
            f"| {row.get('median_tokens_per_s', '-')} | {row.get('peak_memory_gib', '-')} |"
        )
    lines += ["", "Perplexity during training (in-training slice, see `--curve-windows`):", ""]
    for row in rows[2:]:
        points = ", ".join(f"{p['tokens']}: {p['eval_ppl']:.1f}" for p in row["curve"])
        lines.append(f"- {row['variant']}: {points}")
    write_results(RESULTS / f"{stem}.json", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
