"""Step time of AST and MaskLLM against dense fine-tuning of the same model and batch.

One step = forward + backward + optimizer step + the method's own before/after-step work (SR-STE decay,
mask updates, schedules, diagnostics), through each method's `loss` and `make_optimizer` as the training
loop runs them (bf16 autocast on CUDA). The mean over `--steps` consecutive steps is the step time, so
work done every k steps (AST's mask update every Δt = 10, MaskLLM's flip count every 10) is included at
its real rate; the median is shown too. Dense trains every weight. AST adds a frozen teacher's forward,
the distillation loss and the masked forward; "AST boosted" also has SLoRB. MaskLLM trains only the mask
logits (6 per group of 4 for 2:4) with the weights frozen. Targets from the issues: AST <= 1.35x and
MaskLLM <= 1.5x a dense step. Writes JSON and a Markdown table.

    python benchmarks/train_step.py --model smollm2-135m --micro-batch 1 --seq-len 512
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from common import RESULTS, write_results

from semisparse.maskllm import memory_per_weight
from semisparse.methods.ast import ASTConfig, ASTMethod
from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.methods.maskllm import MaskLLMConfig, MaskLLMMethod


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_bytes() -> int:
    """The process's resident memory now (Linux); with gradients and optimizer state alive, as in a step."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_steps(method: Any, batch: torch.Tensor, device: str, repeats: int) -> dict[str, float]:
    """Mean and median seconds of `repeats` optimizer steps after two warm-up steps, and peak memory."""
    config = SimpleNamespace(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    optimizer = method.make_optimizer(method.parameter_groups(), config)
    method.model.train()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else contextlib.nullcontext()
    )
    times, rss = [], 0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        method.before_step(step)
        with autocast:
            loss, _ = method.loss(batch, step)
        loss.backward()
        optimizer.step()
        rss = max(rss, resident_bytes())
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step)
        _sync(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    result = {"mean_step_seconds": statistics.mean(times), "median_step_seconds": statistics.median(times)}
    if device.startswith("cuda"):
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["rss_after_step_bytes"] = rss
    return result


TARGETS = {"ast": 1.35, "maskllm": 1.5}
LABELS = {
    "dense": "dense fine-tuning",
    "ast": "AST 2:4 (teacher, SR-STE, mask update every 10)",
    "ast-boosted": "AST boosted 2:4 (+ SLoRB k=16)",
    "maskllm": "MaskLLM 2:4",
}


def markdown(result: dict[str, Any]) -> str:
    dense = result["methods"]["dense"]
    peak_key = "cuda_peak_bytes" if "cuda_peak_bytes" in dense else "rss_after_step_bytes"
    lines = [
        f"# Training step time vs dense fine-tuning ({result['model']}, {result['device']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; torch {result['torch']} with {result['threads']} threads, "
        f"1-min load average at start {result['load_average_1m_at_start']}. Batch {result['micro_batch']} x "
        f"{result['seq_len']} tokens; mean (and median) of {result['repeats']} consecutive steps after 2 "
        "warm-up steps.",
        "",
        f"| method | mean step s | median step s | tokens/s | x dense | target | {peak_key} GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    tokens = result["micro_batch"] * result["seq_len"]
    for name, row in result["methods"].items():
        seconds = row["mean_step_seconds"]
        target = f"<= {TARGETS[name]}" if name in TARGETS else "-"
        lines.append(
            f"| {LABELS[name]} | {seconds:.3f} | {row['median_step_seconds']:.3f} | {tokens / seconds:.0f} | "
            f"{seconds / dense['mean_step_seconds']:.2f} | {target} | {row[peak_key] / 2**30:.2f} |"
        )
    if "maskllm_state_bytes_per_weight" in result:
        memory = result["maskllm_state_bytes_per_weight"]
        lines += [
            "",
            "MaskLLM training state per masked weight (bytes): "
            + ", ".join(f"{key} {value:g}" for key, value in memory.items()),
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="Timed steps (after 2 warm-up steps).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--machine", default="CPU only, no GPU", help="Free-text machine description.")
    parser.add_argument("--methods", default="dense,ast,ast-boosted,maskllm")
    parser.add_argument("--mask-update-every", type=int, default=10, help="AST's Δt (its default).")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step_cpu.json")
    args = parser.parse_args()

    load_average = os.getloadavg()[0]
    methods = args.methods.split(",")
    steps = args.repeats + 2
    results: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    batch = None
    for name in ["dense", *(m for m in methods if m != "dense")]:
        if name == "dense":
            method: Any = DenseMethod.from_pretrained(args.model, DenseConfig(), steps, args.device)
        elif name in ("ast", "ast-boosted"):
            settings = ASTConfig(slorb=name == "ast-boosted", mask_update_every=args.mask_update_every)
            method = ASTMethod.from_pretrained(args.model, settings, steps, args.device, progress=False)
        elif name == "maskllm":
            settings = MaskLLMConfig(prior="magnitude")
            method = MaskLLMMethod.from_pretrained(args.model, settings, steps, args.device, progress=False)
        else:
            raise SystemExit(f"unknown method {name}: use dense, ast, ast-boosted, maskllm")
        if batch is None:
            generator = torch.Generator().manual_seed(0)
            vocab = method.model.config.vocab_size
            batch = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=generator)
            batch = batch.to(args.device)
        results[name] = time_steps(method, batch, args.device, args.repeats)
        if name == "maskllm":
            extra["maskllm_state_bytes_per_weight"] = memory_per_weight(method.model)
        del method
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": args.machine,
        "model": args.model,
        "device": args.device,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average_1m_at_start": round(load_average, 2),
        "methods": results,
        "over_dense": {
            name: row["mean_step_seconds"] / results["dense"]["mean_step_seconds"]
            for name, row in results.items()
        },
        **extra,
    }
    table = markdown(result)
    written = write_results(args.out, result, table)
    print(table)
    print(f"wrote {args.out} and {written}")


if __name__ == "__main__":
    main()
