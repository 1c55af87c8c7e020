"""Does `OMP_WAIT_POLICY=PASSIVE` stop PyTorch's CPU threads collapsing on a shared machine, and what does it
cost on an idle one?

OpenMP threads that finish a parallel region spin for a while before sleeping (the ACTIVE policy). When a
core is taken by another busy process, a thread of ours waiting at a barrier for a descheduled sibling burns
its time slice spinning: on 2 cores with one other busy process an AST step went from ~5 s to 60-86 s with
2 threads (12.7 s with 1). PASSIVE makes waiting threads sleep at once. The variable must be set before
the OpenMP runtime starts, so every configuration runs in a fresh process:

- thread count: PyTorch's default (one per core) and 1;
- policy: unset (the runtime's default) and PASSIVE (irrelevant with 1 thread, so not repeated there);
- machine: idle, and with one competing busy process (a pure-Python spin loop this script starts and stops).

Workloads (fixed, random weights, no download): forward passes of a 4-layer SmolLM2-shaped Llama, a training
step (forward + backward) of it, and one SparseGPT layer sweep (many small ops: the most barrier-bound).

    python benchmarks/omp_wait_policy.py              # the measurement: run it on an otherwise idle machine
    python benchmarks/omp_wait_policy.py --smoke      # tiny shapes, 1 repeat: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, machine_record, write_results

WORKLOADS = ("forward", "train_step", "sparsegpt_layer")


def run_workloads(smoke: bool, repeats: int) -> dict[str, Any]:
    """In the child: time each workload `repeats` times after one warm-up; median and spread."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from semisparse.nm import NMPattern
    from semisparse.pruning.sparsegpt import sparsegpt_prune_weight

    torch.manual_seed(0)
    hidden, inter, layers, seq = (64, 128, 2, 32) if smoke else (576, 1536, 4, 512)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=9 if not smoke else 4,
        num_key_value_heads=3 if not smoke else 2,
        num_hidden_layers=layers,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 1024, (1, seq))
    x = torch.randn(4 * seq, inter) @ torch.randn(inter, inter) / inter**0.5
    hessian = 2 / x.shape[0] * x.t() @ x
    weight = torch.randn(hidden, inter)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def forward() -> None:
        with torch.no_grad():
            model.eval()
            model(input_ids=ids)

    def train_step() -> None:
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def sparsegpt_layer() -> None:
        sparsegpt_prune_weight(weight, hessian, NMPattern(2, 4), None)

    results = {}
    for name, fn in zip(WORKLOADS, (forward, train_step, sparsegpt_layer), strict=True):
        fn()
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
        median = statistics.median(times)
        results[name] = {"median_s": median, "spread": (max(times) - min(times)) / median, "times_s": times}
    return results


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_workloads(args.smoke, args.repeats)
    record = {"workloads": result, "machine": machine_record()}
    args.child_out.write_text(json.dumps(record, indent=2))


def configurations(threads: list[int | None]) -> list[tuple[int | None, str | None]]:
    found = []
    for count in threads:
        found.append((count, None))
        if count != 1:
            found.append((count, "PASSIVE"))
    return found


def run_configuration(
    args: argparse.Namespace, threads: int | None, policy: str | None, out: Path
) -> dict[str, Any]:
    env = {
        key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
    }
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child-out", str(out), "--repeats", str(args.repeats)]
    command += (["--threads", str(threads)] if threads else []) + (["--smoke"] if args.smoke else [])
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# OMP_WAIT_POLICY=PASSIVE against the default, idle and beside one busy process",
        "",
        f"- torch {record['torch']}; {record['parallel_backend']}; {record['cpus']} CPUs; "
        f"{record['repeats']} repeats after 1 warm-up, median (spread = (max − min) / median)",
        f"- command: `{record['command']}`",
    ]
    if record["smoke"]:
        lines.append("- **smoke mode: tiny shapes, checks that the script runs; the times mean nothing**")
    lines += [
        "",
        "| machine | threads | OMP_WAIT_POLICY | "
        + " | ".join(f"{w}, s" for w in WORKLOADS)
        + " | load at start |",
        "|---|---:|---|" + "---:|" * len(WORKLOADS) + "---|",
    ]
    reference: dict[tuple[str, Any], dict[str, float]] = {}
    for row in record["rows"]:
        cells = []
        key = (row["machine"], row["threads"])
        for name in WORKLOADS:
            timing = row["workloads"][name]
            cell = f"{timing['median_s']:.3f} ({timing['spread']:.0%})"
            if row["policy"] is None:
                reference.setdefault(key, {})[name] = timing["median_s"]
            elif name in reference.get(key, {}):
                cell += f" = {timing['median_s'] / reference[key][name]:.2f}× default"
            cells.append(cell)
        load = row["result_machine"]["load_average_start"]
        lines.append(
            f"| {row['machine']} | {row['threads_used']} | {row['policy'] or 'unset'} | "
            + " | ".join(cells)
            + f" | {load} |"
        )
    lines += [
        "",
        "Read: PASSIVE should be the default if its idle rows cost nothing (≈ 1.00× default) and its busy "
        "rows come close to the 1-thread busy row.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes, one repeat.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", default="default,1", help="Thread counts to try, 'default' = PyTorch's (one per core)."
    )
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds to let the busy process start.")
    parser.add_argument("--name", default=None, help="Result file stem.")
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)  # run one configuration here
    args = parser.parse_args()
    if args.child_out is not None:  # the parent passes a single thread count, or none for the default
        args.threads = int(args.threads) if args.threads.isdigit() else None
        child(args)
        return
    if args.smoke:
        args.repeats, args.settle = 1, 1.0
    threads = [None if part == "default" else int(part) for part in args.threads.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        for machine in ("no competitor", "+1 busy process"):
            spinner = None
            if machine != "no competitor":  # one competing CPU-bound process, started and stopped here
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(args.settle)
            try:
                for count, policy in configurations(threads):
                    result = run_configuration(args, count, policy, out)
                    rows.append({
                        "machine": machine,
                        "threads": count,
                        "threads_used": result["machine"]["threads"],
                        "policy": policy,
                        "workloads": result["workloads"],
                        "result_machine": result["machine"],
                    })  # fmt: skip
                    medians = {k: round(v["median_s"], 3) for k, v in result["workloads"].items()}
                    print(machine, rows[-1]["threads_used"], policy or "unset", medians, flush=True)
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.wait()
    record = {
        "benchmark": "OMP_WAIT_POLICY",
        "torch": torch.__version__,
        "parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "smoke": args.smoke,
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    stem = args.name or ("omp_wait_policy_smoke" if args.smoke else "omp_wait_policy_cpu")
    text = markdown(record)
    write_results(RESULTS / f"{stem}.json", record, text)
    print(text)


if __name__ == "__main__":
    main()
