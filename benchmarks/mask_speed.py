"""Time the 2:4 mask on CPU against a per-column-group Python loop and one elementwise pass.

The loop is what a direct transcription of "top-2 of every 4 columns" looks like; the elementwise pass
(`w.abs()`) is the floor for anything that reads the matrix once. Writes JSON and a Markdown table.

    python benchmarks/mask_speed.py --rows 4096 --cols 11008
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS, write_results

from semisparse.nm import nm_mask


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_mask(scores: torch.Tensor) -> torch.Tensor:
    """The naive baseline: topk over each group of 4 columns, one Python iteration per group."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for g in range(scores.shape[1] // 4):
        block = scores[:, 4 * g : 4 * g + 4]
        mask[:, 4 * g : 4 * g + 4].scatter_(1, block.topk(2, dim=1).indices, True)
    return mask


def cpu_info() -> dict[str, object]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def markdown(result: dict) -> str:
    t, cpu = result["seconds"], result["cpu"]
    speedup, vs_pass = result["loop_over_nm_mask"], result["nm_mask_over_elementwise"]
    return "\n".join(
        [
            f"# 2:4 mask speed on CPU ({result['rows']} x {result['cols']} float32)",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Machine: {result['machine']}; {cpu['processor']}, {cpu['cpu_count']} cores, "
            f"torch {cpu['torch']} with {cpu['torch_threads']} threads, "
            f"1-min load average at start {cpu['load_average_1m_at_start']}.",
            f"Median of {result['repeats']} runs after a warm-up; nm_mask and the loop give the same mask: "
            f"{result['masks_agree']}.",
            "",
            "| operation | median seconds | time / nm_mask |",
            "|---|---:|---:|",
            f"| `nm_mask(scores, 2, 4)` | {t['nm_mask']:.4f} | 1.00 |",
            f"| Python loop over column groups (topk of each 4) | {t['loop']:.4f} | {speedup:.2f} |",
            f"| one elementwise pass (`w.abs()`) | {t['elementwise']:.4f} | {1 / vs_pass:.2f} |",
            "",
            f"nm_mask is {speedup:.1f}x faster than the loop (target >= 2x) and takes {vs_pass:.1f}x one "
            "elementwise pass (target <= ~8x).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default="CPU only, no GPU", help="Free-text machine description.")
    parser.add_argument("--out", type=Path, default=RESULTS / "mask_speed_cpu.json")
    args = parser.parse_args()
    if args.cols % 4:
        parser.error(f"--cols {args.cols} must be a multiple of 4")

    torch.manual_seed(args.seed)
    w = torch.randn(args.rows, args.cols)
    scores = w.abs()
    seconds = {
        "nm_mask": median_seconds(lambda: nm_mask(scores, 2, 4), args.repeats),
        "loop": median_seconds(lambda: loop_mask(scores), args.repeats),
        "elementwise": median_seconds(lambda: w.abs(), args.repeats),
    }
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": args.machine,
        "rows": args.rows,
        "cols": args.cols,
        "dtype": "float32",
        "repeats": args.repeats,
        "seed": args.seed,
        "cpu": cpu_info(),
        "seconds": seconds,
        "loop_over_nm_mask": seconds["loop"] / seconds["nm_mask"],
        "nm_mask_over_elementwise": seconds["nm_mask"] / seconds["elementwise"],
        "masks_agree": bool(torch.equal(nm_mask(scores, 2, 4), loop_mask(scores))),
    }
    table = markdown(result)
    written = write_results(args.out, result, table)
    print(table)
    print(f"wrote {args.out} and {written}")


if __name__ == "__main__":
    main()
