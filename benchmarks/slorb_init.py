"""Perplexity of a SLoRB-boosted 2:4 student before any training, for each way of initialising S.

SLoRB's S starts from the pruned weights' group means in the paper; on top of SparseGPT (whose kept weights
already compensate for the pruned ones) that may start training from a worse model than the one-shot one.

    python benchmarks/slorb_init.py --init-dir runs/demo-sparsegpt-2of4 --max-windows 4
"""

from __future__ import annotations

import argparse
import sys
import time

from common import RESULTS, write_results

from semisparse.data import wikitext2_test_text
from semisparse.evaluation.perplexity import perplexity, tokenize_text
from semisparse.methods.ast import ASTConfig, ASTMethod
from semisparse.models import load_tokenizer
from semisparse.sparse.slorb import SLORB_INITS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--init-dir", default="runs/demo-sparsegpt-2of4")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--name", default="slorb_init_smollm2_cpu")
    args = parser.parse_args()

    ids = tokenize_text(load_tokenizer(args.model), wikitext2_test_text())
    rows = []
    for init in SLORB_INITS:
        settings = ASTConfig(init=args.init_dir, slorb=True, slorb_init=init, alpha_task=1, alpha_kl=0)
        method = ASTMethod.from_pretrained(args.model, settings, 10, "cpu", progress=False)
        result = perplexity(method.model, ids, max_windows=args.max_windows, progress=False)
        rows.append({"slorb_init": init, "perplexity": result.perplexity, "windows": result.n_windows})
        print(rows[-1], flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    lines = [
        f"# SLoRB initialisation on a 2:4 student from `{args.init_dir}`, before training",
        "",
        f"- command: `{record['command']}`; CPU, {record['date']}",
        f"- perplexity: WikiText-2 test, first {rows[0]['windows']} windows of 2048",
        "",
        "| slorb_init | perplexity |",
        "|---|---|",
        *(f"| {row['slorb_init']} | {row['perplexity']:.2f} |" for row in rows),
    ]
    write_results(RESULTS / f"{args.name}.json", record, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
