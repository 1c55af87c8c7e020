"""Layer-level check on the real 2:4 SmolLM2: GPTQ vs round-to-nearest int4 reconstruction error.

A cheap stand-in for the full perplexity run when CPU time is short: inputs of every linear of a few decoder
blocks are captured from the 2:4 model on C4 windows; the first half of the tokens builds each layer's
Hessian, the second half (held out) measures the relative output error `‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖²` of the
int4 (g128, asymmetric) RTN and masked-GPTQ weights. Both stay exactly 2:4 (checked).

    python benchmarks/quantize_layers_smollm2.py --blocks 0,15,29
"""

from __future__ import annotations

import argparse
import platform

import torch
from common import RESULTS, write_results

from semisparse import nm
from semisparse.data import calibration_ids
from semisparse.models import load_model, load_tokenizer
from semisparse.modules import decoder_blocks, find_targets, weight_matrix
from semisparse.quantization import gptq_quantize_weight, rtn_quantize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/demo-sparsegpt-2of4")
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()

    model = load_model(args.model)
    ids, info = calibration_ids(load_tokenizer(args.model), "c4", args.nsamples, args.seqlen, seed=0)
    blocks = [int(b) for b in args.blocks.split(",")]
    prefixes = [
        f"{next(n for n, m in model.named_modules() if m is decoder_blocks(model))}.{b}." for b in blocks
    ]
    targets = {n: m for n, m in find_targets(model).items() if n.startswith(tuple(prefixes))}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

    def keep(name: str, inp: tuple[torch.Tensor, ...]) -> None:
        inputs[name].append(inp[0].reshape(-1, inp[0].shape[-1]))

    hooks = [
        module.register_forward_hook(lambda _m, inp, _o, name=name: keep(name, inp))
        for name, module in targets.items()
    ]
    with torch.no_grad():
        for sample in ids:
            model(input_ids=sample.unsqueeze(0))
    for hook in hooks:
        hook.remove()

    rows = []
    for name, module in targets.items():
        x = torch.cat(inputs[name]).float()
        fit, held = x[: len(x) // 2], x[len(x) // 2 :]
        w = weight_matrix(module).detach().float()
        mask = w != 0
        hessian = 2 * fit.T @ fit / len(fit)
        reference = held @ w.T

        def rel_error(
            q: torch.Tensor, reference: torch.Tensor = reference, held: torch.Tensor = held
        ) -> float:
            return float((reference - held @ q.T).square().sum() / reference.square().sum())

        rtn = rtn_quantize(w, mask, args.bits, args.group_size).dequantize()
        gptq = gptq_quantize_weight(w, mask, hessian, args.bits, args.group_size).dequantize()
        assert nm.is_nm(rtn, 2, 4) and nm.is_nm(gptq, 2, 4)
        rows.append({"layer": name, "shape": list(w.shape), "rtn": rel_error(rtn), "gptq": rel_error(gptq)})
        print(f"{name:40s} rtn {rows[-1]['rtn']:.3e}  gptq {rows[-1]['gptq']:.3e}", flush=True)

    record = {
        "benchmark": "quantize_layers_smollm2",
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "model": args.model,
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration": info,
        "split": "first half of the captured tokens fits the Hessian, second half measures the error",
        "layers": rows,
    }
    lines = [
        f"# SmolLM2-135M 2:4: int{args.bits} g{args.group_size} reconstruction error, RTN vs masked GPTQ",
        "",
        f"- model `{args.model}`; inputs captured on C4 {args.nsamples} × {args.seqlen} (seed 0); Hessian "
        "from the first half of the tokens, relative output error ‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖² on the held-out "
        "second half",
        f"- {record['device']}, torch {record['torch']}; a layer-level check, not perplexity",
        "",
        "| layer | shape | RTN | GPTQ | GPTQ / RTN |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['shape'][0]}×{row['shape'][1]} | {row['rtn']:.3e} | {row['gptq']:.3e} "
            f"| {row['gptq'] / row['rtn']:.2f} |"
        )
    write_results(RESULTS / "quantize_layers_smollm2_cpu.json", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
