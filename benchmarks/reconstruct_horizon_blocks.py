"""Unit losses of a few blocks after reconstruction with fixed or learned masks, for a number of epochs.

A cheap probe of how learned local masks compare with fixed ones as the budget grows, before a whole-model
run: only the listed blocks are reconstructed (the others keep their pruned weights and only feed the next
block), and each block's line gives its time, how much of the mask changed, and the normalised calibration
MSE of the block output and of each unit before and after. `revert_worse` is off, so what training does is
what is reported.

    python benchmarks/reconstruct_horizon_blocks.py --pruned runs/bench-2ep-sgpt/sparsegpt-2of4 --epochs 12 \
        --learn-mask
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer

from semisparse import nm
from semisparse.data import calibration_ids
from semisparse.models import load_model
from semisparse.modules import find_targets
from semisparse.reconstruction import ReconstructConfig, reconstruct


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", required=True, help="A pruned model directory (the sparse start).")
    parser.add_argument("--blocks", default="5,14")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--learn-mask", action="store_true")
    parser.add_argument("--mask-layers", default="", help="Globs of the mask-learning layers.")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, sparse = load_model(args.model), load_model(args.pruned)
    ids, _ = calibration_ids(AutoTokenizer.from_pretrained(args.pruned), "c4", args.nsamples, args.seqlen, 0)
    prefixes = tuple(f"model.layers.{b}." for b in args.blocks.split(","))
    names = [name for name in find_targets(sparse) if name.startswith(prefixes)]
    config = ReconstructConfig(
        epochs=args.epochs, nsamples=args.nsamples, seqlen=args.seqlen, autocast="bf16",
        learn_mask=args.learn_mask, mask_layers=args.mask_layers, revert_worse=False,
    )  # fmt: skip
    for report in reconstruct(dense, sparse, config, ids, names, nm.parse_pattern("2:4"), progress=False):
        units = report["units"]
        line = {
            "learn_mask": args.learn_mask, "mask_layers": config.mask_layers, "epochs": args.epochs,
            "block": report["block"], "seconds": report["seconds"],
            "mask_changed": report.get("mask_changed"),
            "block_loss": [report["block_loss_before"], report["block_loss_after"]],
            "units": {name: [unit["loss_before"], unit["loss_after"]] for name, unit in units.items()},
        }  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
