"""Quantize the 2:4 SmolLM2-135M demo model (int4 GPTQ g128, int4 RTN g128, int8 RTN per-channel) and
compare WikiText-2 perplexity with 2:4 alone, plus honest sizes and the compressed checkpoints on disk.

Every step is a `semisparse` command in its own process (prune if the 2:4 model is missing, quantize,
compress, eval), so the numbers are what a user gets. Results go to benchmarks/results/ as JSON and
Markdown, with the commands and device.

    python benchmarks/quantize_smollm2.py --max-windows 16 --eval-seqlen 512 --reuse   # quick CPU look
    python benchmarks/quantize_smollm2.py                      # full WikiText-2 test on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import RESULTS, device_name, semisparse, write_results

VARIANTS = {
    "gptq-int4-g128": ["--bits", "4", "--method", "gptq", "--group-size", "128"],
    "rtn-int4-g128": ["--bits", "4", "--method", "rtn", "--group-size", "128"],
    "rtn-int8-channel": ["--bits", "8", "--method", "rtn", "--per-channel"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparse", default="runs/demo-sparsegpt-2of4", help="The 2:4 model directory.")
    parser.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows (C4).")
    parser.add_argument("--seqlen", type=int, default=1024, help="GPTQ calibration window length.")
    parser.add_argument("--max-windows", type=int, default=None, help="Perplexity on the first K windows.")
    parser.add_argument("--eval-seqlen", type=int, default=None, help="Perplexity window (default 2048).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-dir", default="runs/bench-quantize")
    parser.add_argument("--with-dense", action="store_true", help="Also evaluate the dense model.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Which of: " + ", ".join(VARIANTS))
    parser.add_argument("--note", default=None, help="A sentence to record with the results.")
    parser.add_argument("--reuse", action="store_true", help="Keep outputs already in --work-dir.")
    parser.add_argument("--name", default=None, help="Result file stem (default: quantize_smollm2_<device>).")
    args = parser.parse_args()

    sparse, work = Path(args.sparse), Path(args.work_dir)
    if not (sparse / "config.json").is_file():
        semisparse("prune", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "32",
                   "--seqlen", "1024", "-o", str(sparse), "--quiet")  # fmt: skip
    calibration = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    rows = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}")
        flags = VARIANTS[name]
        out, packed = work / name, work / f"{name}-compressed"
        if not (args.reuse and (out / "semisparse.json").is_file()):
            semisparse("quantize", str(sparse), *flags, *calibration, "--device", args.device,
                       "-o", str(out), "--overwrite", "--quiet")  # fmt: skip
        if not (args.reuse and (packed / "semisparse.json").is_file()):
            semisparse("compress", str(out), "-o", str(packed), "--overwrite")
        meta = json.loads((out / "semisparse.json").read_text())
        rows[name] = {
            "dir": str(out),
            "quantize_seconds": meta.get("quantize_seconds"),
            "calibration": meta["quantization"]["calibration"],
            "sizes": meta["sizes"],
            "on_disk_bytes": {
                "dequantized_fp32_dir": meta["on_disk_bytes"]["this"],
                "compressed_dir": json.loads((packed / "semisparse.json").read_text())["on_disk_bytes"][
                    "this"
                ],
                "sparse_fp32_source": meta["on_disk_bytes"]["source"],
            },
        }
    dense_24 = work / "sparse-24-compressed"
    if not (args.reuse and (dense_24 / "semisparse.json").is_file()):
        semisparse("compress", str(sparse), "-o", str(dense_24), "--overwrite")
    sparse_compressed_bytes = json.loads((dense_24 / "semisparse.json").read_text())["on_disk_bytes"]["this"]

    window_args = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    window_args += ["--seqlen", str(args.eval_seqlen)] if args.eval_seqlen else []
    models = {"dense": "smollm2-135m"} if args.with_dense else {}
    models |= {"sparse-24": str(sparse)} | {name: row["dir"] for name, row in rows.items()}
    ppl = {}
    for name, model in models.items():
        eval_file = work / f"eval-{name}.json"
        if not (args.reuse and eval_file.is_file()):
            semisparse(
                "eval", model, "--device", args.device, "--output", str(eval_file), "--quiet", *window_args
            )
        ppl[model] = json.loads(eval_file.read_text())[0]
    reference = ppl[str(sparse)]["perplexity"]
    for row in rows.values():
        row["perplexity"] = ppl[row["dir"]]["perplexity"]
        row["x_sparse"] = row["perplexity"] / reference

    first = ppl[str(sparse)]
    record = {
        "benchmark": "quantize_smollm2",
        "device": device_name(args.device),
        "torch": torch.__version__,
        "sparse_model": str(sparse),
        "perplexity_protocol": {
            "dataset": "wikitext2 test",
            "seqlen": first["seqlen"],
            "windows": first["windows"],
            "total_windows": first["total_windows"],
        },
        "dense_perplexity": ppl["smollm2-135m"]["perplexity"] if args.with_dense else None,
        "sparse_perplexity": reference,
        "sparse_compressed_bytes": sparse_compressed_bytes,
        "variants": rows,
        "note": args.note,
        "command": sys.argv,
    }
    stem = args.name or f"quantize_smollm2_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    write_results(RESULTS / f"{stem}.json", record, markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    protocol = record["perplexity_protocol"]
    mib = 2**20
    gptq = record["variants"].get("gptq-int4-g128", {}).get("calibration") or {
        "n_samples": "-",
        "seqlen": "-",
        "seed": "-",
    }
    quick = " (a quick slice, not the full test)" if protocol["windows"] < protocol["total_windows"] else ""
    lines = [
        "# SmolLM2-135M 2:4 + weight-only quantization",
        "",
        f"- device: {record['device']}, torch {record['torch']}; command: `{' '.join(record['command'])}`",
        f"- 2:4 model: `{record['sparse_model']}` (SparseGPT, C4 32 × 1024); GPTQ calibration: C4 "
        f"{gptq['n_samples']} × {gptq['seqlen']}, seed {gptq['seed']}",
        f"- perplexity: WikiText-2 test, first {protocol['windows']} of {protocol['total_windows']} windows "
        f"of {protocol['seqlen']} tokens{quick}",
        "- sizes count the 210 pruned linears only (embeddings/norms are the same for all rows); "
        "'hw meta' is the 2 bits per kept value of the GPU 2:4 format, scales are float16 "
        "(+ uint8 zero points)",
        "",
        "| model | perplexity | × 2:4 alone | targets MiB (values only) | × smaller than fp32, values only "
        "| × with scales + hw meta | compressed dir MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| 2:4 (fp32 values) | {record['sparse_perplexity']:.2f} | 1.00 | – | 2 | – "
        f"| {record['sparse_compressed_bytes'] / mib:.1f} |",
    ]
    if record["note"]:
        lines.insert(lines.index("") if "" in lines else len(lines), f"- **{record['note']}**")
    if record["dense_perplexity"] is not None:
        lines.insert(-1, f"| dense | {record['dense_perplexity']:.2f} | – | – | 1 | 1 | – |")
    for name, row in record["variants"].items():
        sizes, ratios = row["sizes"]["bytes"], row["sizes"]["times_smaller"]
        lines.append(
            f"| 2:4 + {name} | {row['perplexity']:.2f} | {row['x_sparse']:.3f} | {sizes['values'] / mib:.2f} "
            f"| {ratios['dense_fp32/values_only']:.1f} | {ratios['dense_fp32/values_grids_hw_metadata']:.2f} "
            f"| {row['on_disk_bytes']['compressed_dir'] / mib:.1f} |"
        )
    source = next(iter(record["variants"].values()))["on_disk_bytes"]["sparse_fp32_source"]
    lines += [
        "",
        f"The dense-layout fp32 2:4 checkpoint is {source / mib:.1f} MiB on disk. Compressed directories "
        "keep the embeddings (tied with the head) and norms in fp32, which dominate this small model.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
