"""Where SparseGPT's pruning time goes on SmolLM2-135M, judged by a ratio measured within one run.

The sequential engine records capture, the block forwards feeding the Hessians, the Hessian accumulation,
the column sweeps and the block forwards producing the next inputs (`semisparse.pruning.PruneTimings`).
The figure of merit is total / block forwards: what the calibration costs beyond running the blocks, which
a busy machine inflates far less than it inflates the seconds. The target is at most 1.25 with a peak RSS
under 2 GB. Each configuration runs in its own process (its own peak memory):

- `after`: the engine's defaults (one Hessian per distinct input, several samples per block forward);
- `before` (with `--baseline`): every layer its own Hessian and one sample per forward, as the engine
  did before; the pruned weights of both must be identical (checked here, bit for bit).

    python benchmarks/prune_speed.py --threads 2 --baseline           # 128 x 2048, the real measurement
    python benchmarks/prune_speed.py --nsamples 32 --seqlen 1024      # the `make demo` calibration
    python benchmarks/prune_speed.py --smoke                          # 2 x 256: checks the script works

Run it on an idle machine; the record keeps the thread count and the load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, device_name, machine_line, machine_record, write_results

TARGET_RATIO = 1.25
MEMORY_LIMIT = 2 * 1024**3
PARTS = (
    ("capture", "capture (embeddings, block-0 inputs)"),
    ("feed_forwards", "block forwards feeding the Hessians"),
    ("statistics", "Hessian accumulation"),
    ("layer_updates", "column sweeps (per-layer pruning)"),
    ("next_forwards", "block forwards producing the next inputs"),
    ("other", "other (moves, bookkeeping)"),
)


def run_one(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Prune once in this process; the record of the run (breakdown, peak RSS, weights digest)."""
    from semisparse.calibration import Calibration, load_calibration
    from semisparse.models import load_model, load_tokenizer
    from semisparse.modules import find_targets, weight_matrix
    from semisparse.pruning import engine, prune, pruner_config
    from semisparse.runtime import set_threads

    if args.threads:
        set_threads(args.threads)
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    begin = time.perf_counter()
    ids, _ = load_calibration(model, tokenizer, Calibration(nsamples=args.nsamples, seqlen=args.seqlen))
    calibration_seconds = time.perf_counter() - begin

    timings = engine.PruneTimings()
    before = variant == "before"
    original = engine.run_sequential

    def configured(*pos: Any, **kw: Any) -> None:  # the engine's options for this variant
        kw.setdefault("samples_per_forward", 1 if before else args.samples_per_forward)
        kw.setdefault("share_statistics", not before)
        original(*pos, **kw)

    engine.run_sequential = configured
    begin = time.perf_counter()
    prune(model, pruner_config(args.method, pattern=args.pattern), calibration_ids=ids, device=args.device,
          progress=not args.quiet, timings=timings)  # fmt: skip
    wall = time.perf_counter() - begin
    digest = hashlib.sha256()
    for name, module in sorted(find_targets(model).items()):
        digest.update(name.encode())
        digest.update(weight_matrix(module).detach().float().cpu().numpy().tobytes())
    return {
        "variant": variant,
        "prune_seconds": wall,
        "calibration_load_seconds": calibration_seconds,
        "breakdown": timings.to_dict(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weights_sha256": digest.hexdigest(),
        "machine": machine_record(),  # this process's: the load at its start and end
    }


def child_command(args: argparse.Namespace, variant: str, out: Path) -> list[str]:
    command = [sys.executable, __file__, "--child", variant, "--child-out", str(out)]
    flags = ("model", "method", "pattern", "nsamples", "seqlen", "device", "threads", "samples_per_forward")
    for flag in flags:
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    return command + (["--quiet"] if args.quiet else [])


def markdown(record: dict[str, Any]) -> str:
    runs = record["runs"]
    lines = [
        f"# SparseGPT prune speed — {record['model']}, {record['nsamples']} × {record['seqlen']} tokens",
        "",
        f"- {record['device']}, torch {record['torch']}, {record['method']} {record['pattern']}; "
        f"command: `{record['command']}`",
        f"- figure of merit: total / block forwards (target ≤ {TARGET_RATIO}), peak RSS (limit "
        f"{MEMORY_LIMIT / 1024**3:.0f} GB)",
        "",
        "| part | " + " | ".join(f"{run['variant']} s | %" for run in runs) + " |",
        "|---|" + "---:|---:|" * len(runs),
    ]
    for key, label in (*PARTS, ("total", "**total**")):
        cells = []
        for run in runs:
            breakdown = run["breakdown"]
            cells.append(f"{breakdown[key]:.2f} | {100 * breakdown[key] / breakdown['total']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(run["variant"] for run in runs) + " |", "|---|" + "---:|" * len(runs)]
    rows = {
        "block forwards alone, s": lambda r: f"{r['breakdown']['block_forwards']:.2f}",
        "**total / block forwards**": lambda r: f"**{r['breakdown']['ratio']:.3f}**",
        "prune wall time, s": lambda r: f"{r['prune_seconds']:.1f}",
        "samples per block forward": lambda r: str(r["breakdown"]["samples_per_forward"]),
        "layers sharing another's Hessian": lambda r: str(r["breakdown"]["shared_statistics"]),
        "blocks with an explicit attention mask": lambda r: str(r["breakdown"]["masked_blocks"]),
        "peak RSS, GB": lambda r: f"{r['peak_rss_bytes'] / 1024**3:.2f}",
        "threads / load average at the start": lambda r: (
            f"{r['machine']['threads']} / {r['machine']['load_average_start']}"
        ),
    }
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(run) for run in runs) + " |")
    lines.append("")
    if len(runs) > 1:
        same = len({run["weights_sha256"] for run in runs}) == 1
        lines.append(f"Pruned weights of the runs: {'identical, bit for bit' if same else '**DIFFERENT**'}.")
    ratio = runs[-1]["breakdown"]["ratio"]
    peak = runs[-1]["peak_rss_bytes"]
    verdict = "meets" if ratio <= TARGET_RATIO and peak <= MEMORY_LIMIT else "misses"
    lines.append(
        f"The `{runs[-1]['variant']}` run {verdict} the target: ratio {ratio:.3f} (≤ {TARGET_RATIO}), "
        f"peak RSS {peak / 1024**3:.2f} GB (≤ 2 GB)."
    )
    if record.get("smoke"):
        lines.append("**Smoke mode (2 × 256): checks that the script runs; the ratio means nothing here.**")
    for run in runs:
        lines.append(f"`{run['variant']}`: " + machine_line(run["machine"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's).")
    parser.add_argument("--samples-per-forward", type=int, default=None, help="Default: the engine's.")
    parser.add_argument("--baseline", action="store_true", help="Also run the engine as it was (`before`).")
    parser.add_argument("--smoke", action="store_true", help="2 x 256 calibration: checks the script only.")
    parser.add_argument("--name", default=None, help="Result file stem (default from the settings).")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(run_one(args, args.child), indent=2))
        return
    if args.smoke:
        args.nsamples, args.seqlen = 2, 256

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["before", "after"] if args.baseline else ["after"]:
            out = Path(tmp) / f"{variant}.json"
            subprocess.run(child_command(args, variant, out), check=True, env=os.environ.copy())
            runs.append(json.loads(out.read_text()))
    record = {
        "benchmark": "SparseGPT prune speed breakdown",
        "model": args.model,
        "method": args.method,
        "pattern": args.pattern,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "parallel_info": [
            line.strip() for line in torch.__config__.parallel_info().splitlines() if line.strip()
        ],
        "command": " ".join(["python", *sys.argv]),
        "smoke": args.smoke,
        "target_ratio": TARGET_RATIO,
        "memory_limit_bytes": MEMORY_LIMIT,
        "runs": runs,
    }
    stem = args.name or (
        "prune_speed_smoke" if args.smoke else f"prune_speed_{args.nsamples}x{args.seqlen}_{args.device}"
    )
    text = markdown(record)
    write_results(RESULTS / f"{stem}.json", record, text)
    print(text)


if __name__ == "__main__":
    main()
