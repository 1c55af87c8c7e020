"""Speed of 2:4 against dense: per-layer matmuls at a model's real shapes, and end-to-end prefill / decode.

On a GPU every number is a median over repeats timed with CUDA events after warm-up, the 2:4 side using
PyTorch's semi-structured kernels (`semisparse.acceleration`). Speed needs only the shapes, so the
Llama-2-7B / Llama-3-8B presets use random weights pruned to 2:4, and the end-to-end model is a few
decoder layers of that shape (the per-token cost of a layer does not depend on how many follow it).

Without a GPU there is no 2:4 kernel: the reduced mode times small shapes by wall clock with the 2:4 side
running dense weights with zeros, which checks that the harness works and is not a speed claim.

Every timing keeps the spread of its repeats, `(max - min) / median`. When either side of a comparison
spreads more than `UNSTABLE_SPREAD`, something else was competing for the machine (on a 2-core CPU shared
with one busy process a 0.3 ms matmul can take 80 ms), so the tables say "unstable" instead of a ratio.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from semisparse import nm
from semisparse.acceleration import accelerate, gpu_fallback_reason, to_semi_structured
from semisparse.errors import SemisparseError
from semisparse.models import load_model
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, prune
from semisparse.runtime import default_device, machine_state


def group_shapes(named: Sequence[tuple[str, tuple[int, int]]]) -> dict[str, tuple[int, int]]:
    """{"q_proj/o_proj": (out, in), ...}: one entry per distinct shape, in first-seen order."""
    found: dict[tuple[int, int], list[str]] = {}
    for name, shape in named:
        if name not in found.setdefault(shape, []):
            found[shape].append(name)
    return {"/".join(names): shape for shape, names in found.items()}


@dataclass(frozen=True)
class Shapes:
    """The dimensions of a Llama-style decoder, enough for its linear shapes and a few-layer model."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """Unique (out, in) linear shapes of one decoder layer, named by the projections that have them."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return group_shapes(
            [("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h)),
             ("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]
        )  # fmt: skip

    def config(self, layers: int) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            num_hidden_layers=layers,
            max_position_embeddings=16384,
        )


PRESETS = {
    "llama2-7b": Shapes(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "llama3-8b": Shapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
}
REDUCED = Shapes(hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=512)
DEFAULT_TOKENS = (1, 16, 128, 2048, 8192)
REDUCED_TOKENS = (1, 16, 128)


# A comparison whose repeats spread more than this on either side prints "unstable" instead of a ratio.
UNSTABLE_SPREAD = 0.5


@dataclass(frozen=True)
class Timing:
    """The median of a few repeated timings, and their spread `(max - min) / median`."""

    seconds: float
    spread: float

    @classmethod
    def of(cls, times: Sequence[float]) -> Timing:
        if not times:
            raise ValueError("no timings")
        median = statistics.median(times)
        spread = (max(times) - min(times)) / median if median > 0 else float("inf")
        return cls(median, spread)


def unstable_spread(*spreads: float) -> float | None:
    """The largest spread if any side of a comparison spread more than `UNSTABLE_SPREAD`, else None."""
    worst = max(spreads)
    return worst if worst > UNSTABLE_SPREAD else None


def ratio_cell(ratio: float | None, spreads: Sequence[float]) -> str:
    """`**1.23×**`, or `unstable (spread 240%)` when the timings behind the ratio did not repeat."""
    worst = unstable_spread(*spreads) if spreads else None
    if worst is not None:
        return f"unstable (spread {worst:.0%})"
    return "n/a" if ratio is None else f"**{ratio:.2f}×**"


def _median_seconds(
    fn: Callable[[Any], Any],
    warmup: int,
    repeats: int,
    cuda: bool,
    setup: Callable[[], Any] = lambda: None,
) -> Timing:
    """Median (and spread) of `fn(setup())` after warm-up, `setup` untimed; CUDA events on a GPU, else wall
    clock."""
    for _ in range(warmup):
        fn(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(state)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn(state)
            times.append(time.perf_counter() - begin)
    return Timing.of(times)


def random_24(out: int, inp: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """A random weight pruned to 2:4 by magnitude."""
    generator = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(out, inp, generator=generator, device=device, dtype=torch.float32) / inp**0.5
    return (w * nm.nm_mask(w.abs(), 2, 4)).to(dtype)


@torch.no_grad()
def layer_times(
    shapes: dict[str, tuple[int, int]],
    tokens: Sequence[int],
    dtype: torch.dtype,
    device: str,
    backend: str | None,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Dense vs 2:4 `F.linear` time per (shape, token count); on CPU the 2:4 side is dense with zeros."""
    cuda = device.startswith("cuda")
    rows = []
    for name, (out, inp) in shapes.items():
        weight = random_24(out, inp, dtype, device)
        sparse, reason = weight, None
        if cuda:
            try:
                sparse = to_semi_structured(weight, backend)
            except (SemisparseError, RuntimeError) as err:
                reason = str(err).splitlines()[0]
        for count in tokens:
            x = torch.randn(count, inp, device=device, dtype=dtype)
            dense = _median_seconds(lambda _, x=x, w=weight: F.linear(x, w), warmup, repeats, cuda)
            dense_s = dense.seconds
            row: dict[str, Any] = {
                "layer": name,
                "out": out,
                "in": inp,
                "tokens": count,
                "dense_ms": dense_s * 1e3,
                "dense_spread": dense.spread,
            }
            if reason is None:
                timed = _median_seconds(lambda _, x=x, w=sparse: F.linear(x, w), warmup, repeats, cuda)
                sparse_s = timed.seconds
                error = (F.linear(x, sparse).float() - F.linear(x, weight).float()).abs().max().item()
                row.update(sparse_ms=sparse_s * 1e3, speedup=dense_s / sparse_s, max_abs_diff=error)
                row.update(
                    sparse_spread=timed.spread,
                    unstable=unstable_spread(dense.spread, timed.spread) is not None,
                )
                row["dense_tflops"] = 2 * count * out * inp / dense_s / 1e12
            else:
                row.update(sparse_ms=None, speedup=None, skipped=reason)
            rows.append(row)
            del x
    return rows


def _prefill_and_decode(
    model: nn.Module, prefill: int, decode: int, warmup: int, repeats: int, cuda: bool, vocab: int
) -> dict[str, float]:
    """Prefill tokens/s (one [1, prefill] forward, no cache); greedy decode tokens/s after a short prompt."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill), device=device, generator=generator)
    prompt = ids[:, : min(128, prefill)]

    def run_prefill(_: None) -> None:
        model(input_ids=ids, use_cache=False)

    def start_decode() -> tuple[Any, torch.Tensor]:
        out = model(input_ids=prompt, use_cache=True)
        return out.past_key_values, out.logits[:, -1:].argmax(-1)

    def run_decode(state: tuple[Any, torch.Tensor]) -> None:
        cache, token = state
        for _ in range(decode):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prefill_t = _median_seconds(run_prefill, warmup, repeats, cuda)
    decode_t = _median_seconds(run_decode, max(1, warmup // 2), max(1, repeats // 2), cuda, start_decode)
    return {
        "prefill_tokens_per_s": prefill / prefill_t.seconds,
        "decode_tokens_per_s": decode / decode_t.seconds,
        "prefill_spread": prefill_t.spread,
        "decode_spread": decode_t.spread,
    }


@torch.no_grad()
def end_to_end(
    model: nn.Module,
    prefill: int,
    decode: int,
    dtype: torch.dtype,
    backend: str | None,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Dense-with-zeros vs accelerated 2:4 on the same model; the model is accelerated in place."""
    cuda = next(model.parameters()).device.type == "cuda"
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.arange(min(prefill, 64), device=next(model.parameters()).device).unsqueeze(0) % vocab
    reference = model(input_ids=probe).logits.float()
    dense = _prefill_and_decode(model, prefill, decode, warmup, repeats, cuda, vocab)
    report = accelerate(model, backend=backend)
    sparse = _prefill_and_decode(model, prefill, decode, warmup, repeats, cuda, vocab)
    difference = (model(input_ids=probe).logits.float() - reference).abs().max().item()
    return {
        "prefill_tokens": prefill,
        "decode_tokens": decode,
        "batch": 1,
        "dense": dense,
        "sparse_24": sparse,
        "prefill_speedup": sparse["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "decode_speedup": sparse["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "prefill_unstable": unstable_spread(dense["prefill_spread"], sparse["prefill_spread"]) is not None,
        "decode_unstable": unstable_spread(dense["decode_spread"], sparse["decode_spread"]) is not None,
        "max_abs_logit_diff": difference,
        "acceleration": report.to_dict() | {"summary": report.summary()},
        "dtype": str(dtype).removeprefix("torch."),
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Unique (out, in) shapes of a loaded model's target layers, named by their projections."""
    named = [
        (name.rsplit(".", 1)[-1], tuple(weight_matrix(m).shape)) for name, m in find_targets(model).items()
    ]
    return group_shapes(named)


def run_bench(
    model_name: str | None = None,
    preset: str | None = None,
    tokens: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    backend: str | None = None,
    reduced: bool = False,
    e2e_layers: int = 4,
    prefill: int = 2048,
    decode: int = 64,
    warmup: int = 5,
    repeats: int = 20,
    device: str | None = None,
    end_to_end_too: bool = True,
) -> dict[str, Any]:
    """The whole benchmark as one JSON-ready record (see `markdown` for the table form)."""
    if model_name is not None and preset is not None:
        raise SemisparseError("give a model or `preset`, not both")
    if preset is not None and preset not in PRESETS:
        raise SemisparseError(f"unknown `preset` '{preset}': use one of {', '.join(PRESETS)}")
    device = device or default_device()
    why_dense = gpu_fallback_reason(torch.device(device))
    if why_dense is not None and not reduced:
        raise SemisparseError(f"full benchmark needs a GPU ({why_dense}): add `reduced` for the CPU check")
    if reduced:
        tokens = tokens or REDUCED_TOKENS
        warmup, repeats = min(warmup, 2), min(repeats, 5)
        prefill, decode, e2e_layers = min(prefill, 128), min(decode, 8), min(e2e_layers, 2)
        if why_dense is not None:
            dtype = torch.float32
    tokens = tuple(tokens or DEFAULT_TOKENS)
    if any(t < 1 for t in tokens) or prefill < 1 or decode < 1:
        raise SemisparseError(
            "token counts (`tokens`, `prefill`, `decode`) must be positive integers, e.g. `tokens`=1,16,128"
        )
    model = None
    if model_name is not None:
        model = load_model(model_name, dtype=dtype, device=device)
        shapes, source = _model_shapes(model), model_name
    else:
        spec = REDUCED if reduced and preset is None else PRESETS[preset or "llama2-7b"]
        shapes, source = spec.linears(), preset or ("reduced" if reduced else "llama2-7b")
        if reduced and preset is not None:
            shapes = REDUCED.linears()
            source = f"{preset} (reduced: small stand-in shapes)"
    machine = machine_state()
    record: dict[str, Any] = {
        "benchmark": "2:4 vs dense",
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": machine["threads"],
        "cpus": machine["cpus"],
        "load_average_start": machine["load_average"],
        "unstable_spread": UNSTABLE_SPREAD,
        "mode": "reduced" if reduced else "full",
        "timing": "CUDA events, median" if why_dense is None else "wall clock, median",
        "warmup": warmup,
        "repeats": repeats,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "shapes_from": source,
        "note": None
        if why_dense is None
        else f"not a speed claim: {why_dense}, so the 2:4 side runs dense weights with zeros",
        "layers": layer_times(shapes, tokens, dtype, device, backend, warmup, repeats),
    }
    if end_to_end_too:
        if model is None:
            spec = REDUCED if reduced else PRESETS[preset or "llama2-7b"]
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(spec.config(e2e_layers), dtype=dtype).eval()
            record["end_to_end_model"] = f"{e2e_layers}-layer Llama of {source} shapes, random 2:4 weights"
        else:
            record["end_to_end_model"] = (
                f"{model_name}, its target layers pruned to 2:4 by magnitude if needed"
            )
        if not all(nm.is_nm(weight_matrix(m), 2, 4) for m in find_targets(model).values()):
            prune(model, MagnitudeConfig(pattern="2:4"))
        record["end_to_end"] = end_to_end(model, prefill, decode, dtype, backend, warmup, repeats)
    record["load_average_end"] = machine_state()["load_average"]
    return record


def _load(values: list[float] | None) -> str:
    return "unknown" if values is None else " / ".join(f"{v:.2f}" for v in values)


def markdown(record: dict[str, Any]) -> str:
    """Tables of a `run_bench` record: per-layer speedups by token count, then end to end."""
    lines = [
        f"# 2:4 vs dense — {record['device']}",
        "",
        f"- torch {record['torch']}, {record['dtype']}, {record['mode']} mode, {record['timing']} of "
        f"{record['repeats']} after {record['warmup']} warm-up; shapes from {record['shapes_from']}",
    ]
    if record["note"]:
        lines.append(f"- **{record['note']}**")
    if "threads" in record:
        lines.append(
            f"- {record['threads']} PyTorch threads on {record['cpus']} CPUs; load average (1 / 5 / 15 min) "
            f"{_load(record['load_average_start'])} at the start, {_load(record.get('load_average_end'))} "
            "at the end"
        )
    tokens = sorted({row["tokens"] for row in record["layers"]})
    lines += ["", "| layer (out × in) | " + " | ".join(f"{t} tok" for t in tokens) + " |"]
    lines.append("|---|" + "---:|" * len(tokens))
    by_layer: dict[str, dict[int, dict[str, Any]]] = {}
    for row in record["layers"]:
        by_layer.setdefault(f"{row['layer']} ({row['out']} × {row['in']})", {})[row["tokens"]] = row
    for label, cells in by_layer.items():
        shown = []
        for t in tokens:
            row = cells[t]
            if row["speedup"] is None:
                shown.append("skipped")
            else:
                spreads = [row[k] for k in ("dense_spread", "sparse_spread") if k in row]
                cell = ratio_cell(row["speedup"], spreads)
                shown.append(f"{row['dense_ms']:.3f} / {row['sparse_ms']:.3f} ms = {cell}")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    lines.append("")
    lines.append(
        "Cells: dense ms / 2:4 ms = speedup (> 1 means 2:4 is faster); medians of the repeats. "
        f'"unstable": the repeats of one side spread (max − min) / median more than {UNSTABLE_SPREAD:.0%}, '
        "so the machine was busy with something else and no ratio is given: rerun on an idle machine "
        "(or with fewer threads)."
    )
    e2e = record.get("end_to_end")
    if e2e:
        lines += [
            "",
            f"End to end ({record['end_to_end_model']}; batch 1, prefill {e2e['prefill_tokens']} tokens, "
            f"decode {e2e['decode_tokens']} tokens after a 128-token prompt; "
            f"{e2e['acceleration']['summary']}):",
            "",
            "| | dense | 2:4 | speedup |",
            "|---|---:|---:|---:|",
            f"| prefill tokens/s | {e2e['dense']['prefill_tokens_per_s']:.1f} | "
            f"{e2e['sparse_24']['prefill_tokens_per_s']:.1f} | {_e2e_cell(e2e, 'prefill')} |",
            f"| decode tokens/s | {e2e['dense']['decode_tokens_per_s']:.1f} | "
            f"{e2e['sparse_24']['decode_tokens_per_s']:.1f} | {_e2e_cell(e2e, 'decode')} |",
            "",
            f"Max |logit difference| 2:4 kernels vs dense with zeros: {e2e['max_abs_logit_diff']:.3g}.",
        ]
    return "\n".join(lines) + "\n"


def _e2e_cell(e2e: dict[str, Any], phase: str) -> str:
    key = f"{phase}_spread"
    spreads = [side[key] for side in (e2e["dense"], e2e["sparse_24"]) if key in side]
    return ratio_cell(e2e[f"{phase}_speedup"], spreads).replace("**", "")
