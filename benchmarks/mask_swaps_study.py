"""Do second-order mask swaps pay after block-wise reconstruction? (issue 14: learned vs fixed masks)

For the chosen blocks of a pruned model, each attn-mlp unit is reconstructed with its mask fixed
(`--epochs`, the `reconstruct` defaults otherwise). From that point the script compares, on the unit's
calibration loss, one more epoch of kept-weight training at each of `--lrs` without swaps against the same
epoch after `semisparse.reconstruction.swaps` moved one weight in the best-scored `--fractions` of the N:M
groups (grown weights start at zero), and records the loss right after the swaps. The unit is put back
after each variant, so every variant starts from the same reconstructed unit. Blocks not listed keep their
pruned weights (only their outputs feed the next block).

    python benchmarks/mask_swaps_study.py --pruned runs/bench-2ep-sgpt/sparsegpt-2of4 --blocks 5,14 \
        --name mask_swaps_study_sparsegpt_32x2048
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, write_results
from torch import Tensor
from transformers import AutoTokenizer
from transformers.pytorch_utils import Conv1D

from semisparse import nm
from semisparse.data import calibration_ids
from semisparse.models import load_model
from semisparse.modules import find_targets
from semisparse.reconstruction import ReconstructConfig
from semisparse.reconstruction.core import Reconstructor
from semisparse.reconstruction.swaps import apply_swaps, gradient_and_curvature
from semisparse.reconstruction.units import Activations, BlockState, Unit, batches, restore, snapshot


class SwapStudy(Reconstructor):
    """A reconstruction whose swap step measures the variants instead of choosing one."""

    def __init__(self, *args: Any, fractions: list[float], lrs: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fractions, self.lrs = fractions, lrs
        self.rows: list[dict[str, Any]] = []

    def _epoch(self, state: BlockState, unit: Unit, forward: Callable[[Tensor], Tensor], acts: Activations,
               lr: float) -> float:  # fmt: skip
        peak, self.config.lr = self.config.lr, lr
        start = snapshot(state, unit)
        try:
            self._train(
                state, unit, forward, acts, len(batches(acts.inputs.shape[0], self.config.batch_size)), {}
            )
            return self._loss(state, forward, acts)
        finally:
            restore(state, start)
            self.config.lr = peak

    def _swap(self, state: BlockState, unit: Unit, forward: Callable[[Tensor], Tensor], acts: Activations,
              record: dict[str, Any]) -> int:  # fmt: skip
        config = self.config
        row: dict[str, Any] = {
            "block": state.index,
            "unit": unit.name,
            "loss": self._loss(state, forward, acts),
        }
        row["epoch"] = {str(lr): self._epoch(state, unit, forward, acts, lr) for lr in self.lrs}
        start = snapshot(state, unit)
        modules = [state.sparse.get_submodule(name) for name in unit.layers]
        layers = [(module, isinstance(module, Conv1D)) for module in modules]
        scored = batches(min(config.swap_windows, acts.inputs.shape[0]), config.batch_size)
        with self._precision(state.sparse):
            grads, curvature = gradient_and_curvature(
                layers, [(acts.inputs[r], acts.targets[r]) for r in scored], forward, acts.variance,
                torch.Generator().manual_seed(config.seed),
            )  # fmt: skip
        row["swaps"] = {}
        for fraction in self.fractions:
            masks, changed = apply_swaps(
                layers, [start.masks[n] for n in unit.layers], grads, curvature, self.pattern, fraction
            )
            state.masks.update(zip(unit.layers, masks, strict=True))
            swapped = {
                "changed": changed / sum(int(m.numel()) for m in masks),
                "loss": self._loss(state, forward, acts),
            }
            swapped["epoch"] = {str(lr): self._epoch(state, unit, forward, acts, lr) for lr in self.lrs}
            row["swaps"][str(fraction)] = swapped
            restore(state, start)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        record["loss_after"], record["mask_changed"] = row["loss"], 0.0
        return 0


def markdown(record: dict[str, Any]) -> str:
    lrs = record["lrs"]
    head = (
        "| block / unit | variant | after swaps | " + " | ".join(f"+1 epoch at lr {lr}" for lr in lrs) + " |"
    )
    lines = [f"# {record['title']}", "", record["about"], "", head, "|---|---|---:|" + "---:|" * len(lrs)]
    for row in record["rows"]:
        where = f"{row['block']} {row['unit']}"
        epoch = " | ".join(f"{row['epoch'][str(lr)]:.5f}" for lr in lrs)
        lines.append(f"| {where} | no swaps (loss {row['loss']:.5f}) | | {epoch} |")
        for fraction, swapped in row["swaps"].items():
            best = " | ".join(
                f"**{value:.5f}**" if value < row["epoch"][lr] else f"{value:.5f}"
                for lr, value in swapped["epoch"].items()
            )
            label = f"swap {float(fraction):.1%} of groups ({swapped['changed']:.2%} of the mask)"
            lines.append(f"| {where} | {label} | {swapped['loss']:.5f} | {best} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", required=True, help="A pruned model directory (the sparse start).")
    parser.add_argument("--blocks", default="5,14")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fractions", default="0.002,0.01,0.03")
    parser.add_argument("--lrs", default="3e-3,1e-3,3e-4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, sparse = load_model(args.model), load_model(args.pruned)
    ids, _ = calibration_ids(AutoTokenizer.from_pretrained(args.pruned), "c4", args.nsamples, args.seqlen, 0)
    blocks = [int(b) for b in args.blocks.split(",")]
    names = [n for n in find_targets(sparse) if any(n.startswith(f"model.layers.{b}.") for b in blocks)]
    config = ReconstructConfig(epochs=args.epochs, nsamples=args.nsamples, seqlen=args.seqlen,
                               autocast="bf16", swap_masks=True, revert_worse=False)  # fmt: skip
    study = SwapStudy(dense, sparse, config, nm.parse_pattern("2:4"), names, progress=False,
                      fractions=[float(f) for f in args.fractions.split(",")],
                      lrs=[float(lr) for lr in args.lrs.split(",")])  # fmt: skip
    study.run(ids)
    record = {
        "title": f"Mask swaps after reconstruction: {Path(args.pruned).name}, blocks {args.blocks}",
        "about": (
            f"`python benchmarks/mask_swaps_study.py {' '.join(sys.argv[1:])}`: "
            f"{args.nsamples} x {args.seqlen} C4 windows, attn-mlp units reconstructed {args.epochs} epochs "
            "(bf16, batch 1, lr 3e-3), then the "
            "unit's normalised calibration MSE after one more epoch without / after swaps. Bold: the swap "
            "variant beats the same epoch without swaps."
        ),
        "command": ["python", "benchmarks/mask_swaps_study.py", *sys.argv[1:]],
        "lrs": [str(float(lr)) for lr in args.lrs.split(",")],
        "rows": study.rows,
    }
    print(write_results(RESULTS / f"{args.name}.json", record, markdown(record)))


if __name__ == "__main__":
    main()
