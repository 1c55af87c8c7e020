"""The built-in stages of a recipe: prune, reconstruct, train, quantize, compress and eval.

Each is a `StageConfig` registered as kind "stage" with its implementation, which runs the same job as
the command of that name (`semisparse prune`, `quantize`, `compress` call these very implementations with
their `-o` as the output directory). The train stage lives in `semisparse.jobs.train_stage`, the
reconstruct stage in `semisparse.jobs.reconstruct`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from semisparse import registry
from semisparse.calibration import Calibration
from semisparse.data import EVALUATION_DATASETS
from semisparse.errors import SemisparseError
from semisparse.evaluation.comparison import format_table
from semisparse.evaluation.zeroshot import DEFAULT_SEED, parse_tasks
from semisparse.export import atomic_directory, provenance
from semisparse.jobs.base import Stage, StageConfig, TechniqueStageConfig, check_calibration_source
from semisparse.jobs.evaluate import evaluate_models
from semisparse.jobs.prune import prune_to_dir
from semisparse.jobs.quantize import compress_to_dir, quantize_to_dir
from semisparse.registry import register
from semisparse.settings import setting

# Data types a model can be loaded in (the keys of `semisparse.runtime.DTYPES`).
DType = Literal["float32", "bfloat16", "float16"]
RESULTS_FILE = "results.json"
RESULTS_TABLE = "results.md"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass
class CalibratedStageConfig(TechniqueStageConfig):
    """A technique stage with calibration windows (`source`, `nsamples` x `seqlen`, `seed`) and globs."""

    source: str = setting("c4", "calibration data: c4, wikipedia (data mirror) or a local .txt/.jsonl file")
    nsamples: int = setting(128, "calibration windows", minimum=1)
    seqlen: int = setting(2048, "tokens per calibration window", minimum=1)
    seed: int = setting(0, "seed of the calibration window draw")
    include: list[str] = setting([], "only layers matching these globs")
    exclude: list[str] = setting([], "never layers matching these globs")
    device: str | None = setting(None, "cuda, cuda:1 or cpu (none: cuda if available)")

    def check(self) -> None:
        super().check()
        if registry.lookup(self.technique_kind, self.method).needs_calibration:
            check_calibration_source(self.source)

    def calibration(self) -> Calibration:
        return Calibration(source=self.source, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)


@dataclass
class PruneStageConfig(CalibratedStageConfig):
    """One-shot pruning by a registered pruner, its settings (`pattern`, `blocksize`, ...) flattened in."""

    owner: ClassVar[str] = "prune stage"
    technique_kind: ClassVar[str] = "pruner"

    method: str = setting("sparsegpt", "a registered pruner: magnitude, wanda, sparsegpt")
    dtype: DType = setting("float32", "dtype the model is loaded, pruned and saved in")


@register("stage", "prune", PruneStageConfig, summary="One-shot pruning to N:M (or unstructured) sparsity.")
class PruneStage(Stage):
    """`jobs.prune.prune_to_dir`: prune the input model and save it with its provenance."""

    @classmethod
    def run(
        cls,
        config: PruneStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        return prune_to_dir(
            input_model,
            out,
            config.technique(),
            config.calibration(),
            include=config.include,
            exclude=config.exclude,
            device=config.device,
            dtype=config.dtype,
            overwrite=overwrite,
            progress=progress,
        )

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        target = metadata.get("pattern") or metadata.get("sparsity")
        return f"{metadata.get('method')} {target}, {metadata.get('overall_sparsity', 0):.2%} zeros"


# The train stage (its own module, it needs the training package) registers second, so the stages list in
# pipeline order: prune, train, quantize, compress, eval.
from semisparse.jobs import train_stage  # noqa: E402, F401


@dataclass
class QuantizeStageConfig(CalibratedStageConfig):
    """Quantization by a registered quantizer, its settings (`bits`, `group_size`, ...) flattened in."""

    owner: ClassVar[str] = "quantize stage"
    technique_kind: ClassVar[str] = "quantizer"

    method: str = setting("gptq", "a registered quantizer: rtn, gptq")
    compressed: bool = setting(False, "write the compressed 2:4 bitmask layout (packed codes)")


@register("stage", "quantize", QuantizeStageConfig, summary="int8/int4 quantization that keeps the zeros.")
class QuantizeStage(Stage):
    """`jobs.quantize.quantize_to_dir`: quantize the input model's kept weights and save it."""

    @classmethod
    def run(
        cls,
        config: QuantizeStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        return quantize_to_dir(
            input_model,
            out,
            config.technique(),
            config.calibration(),
            include=config.include,
            exclude=config.exclude,
            compressed=config.compressed,
            device=config.device,
            overwrite=overwrite,
            progress=progress,
        )

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        return f"{metadata.get('method')}, {_mib(metadata.get('on_disk_bytes', {}).get('this', 0))}"


@dataclass
class CompressStageConfig(StageConfig):
    """The compressed 2:4 bitmask layout of the input model, in semisparse's or compressed-tensors' format."""

    owner: ClassVar[str] = "compress stage"

    format: Literal["semisparse", "compressed-tensors"] = setting(
        "semisparse",
        "semisparse (also int4/int8 codes, GPT-2) or compressed-tensors (that library's sparse-24-bitmask, "
        "unquantized; loads with compressed-tensors 0.14.0.1 + transformers 4.57)",
    )


@register("stage", "compress", CompressStageConfig, summary="Store 2:4 layers as kept values plus a bitmask.")
class CompressStage(Stage):
    """`jobs.quantize.compress_to_dir`: lossless 2:4 storage of the input model."""

    @classmethod
    def run(
        cls,
        config: CompressStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        return compress_to_dir(input_model, out, overwrite, format=config.format)

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        sizes = metadata.get("on_disk_bytes", {})
        return f"{_mib(sizes.get('this', 0))} on disk, was {_mib(sizes.get('source', 0))}"


@dataclass
class EvalStageConfig(StageConfig):
    """Perplexity on `dataset` and optional zero-shot `tasks` of the current model (and the base model)."""

    owner: ClassVar[str] = "eval stage"

    dataset: str | None = setting(
        "wikitext2", "perplexity text: wikitext2, c4-eval, a local text file, or none"
    )
    seqlen: int | None = setting(None, "perplexity window length (none: min(2048, context))", minimum=1)
    max_windows: int | None = setting(None, "evaluate only the first K windows (none: all)", minimum=1)
    batch_size: int = setting(1, "windows / requests per forward pass", minimum=1)
    tasks: list[str] = setting([], "zero-shot tasks through lm-evaluation-harness: all, or task names")
    limit: int | None = setting(None, "only the first N examples of each task (none: all)", minimum=1)
    seed: int = setting(DEFAULT_SEED, "lm-evaluation-harness random seed")
    baseline: bool = setting(False, "also evaluate the recipe's base model, first, as the reference")
    dtype: DType = setting("float32", "dtype the models are evaluated in")
    device: str | None = setting(None, "cuda, cuda:1 or cpu (none: cuda if available)")

    def check(self) -> None:
        if self.dataset is not None and self.dataset.strip().lower() == "none":
            self.dataset = None
        if self.dataset not in (None, *EVALUATION_DATASETS) and not Path(self.dataset).expanduser().is_file():
            raise SemisparseError(
                f"eval stage `dataset` '{self.dataset}' is neither wikitext2 nor an existing text file "
                f"(named datasets: {', '.join(EVALUATION_DATASETS)})"
            )
        self.tasks = parse_tasks(self.tasks)
        if self.dataset is None and not self.tasks:
            raise SemisparseError("the eval stage has nothing to do: set `dataset` and/or `tasks`")


@register("stage", "eval", EvalStageConfig, summary="Perplexity and zero-shot accuracy (no model written).")
class EvalStage(Stage):
    """`jobs.evaluate.evaluate_models`; writes results.json (the report) and results.md in `out`."""

    produces_model = False

    @classmethod
    def run(
        cls,
        config: EvalStageConfig,
        input_model: str,
        out: Path,
        base_model: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        models = [base_model, input_model] if config.baseline and base_model != input_model else [input_model]
        report = evaluate_models(
            models,
            ppl=config.dataset,
            tasks=config.tasks or None,
            limit=config.limit,
            batch_size=config.batch_size,
            seqlen=config.seqlen,
            max_windows=config.max_windows,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
            progress=progress,
        )
        row = report["table"][-1]
        metadata = provenance(
            stage="eval",
            model=input_model,
            results=RESULTS_FILE,
            perplexity=row.get("perplexity"),
            mean_acc=row.get("mean_acc"),
            settings=report["settings"],
            data=report["data"],
        )
        with atomic_directory(out, overwrite) as tmp:
            (tmp / RESULTS_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
            (tmp / RESULTS_TABLE).write_text(format_table(report, markdown=True) + "\n")
        return metadata

    @classmethod
    def summary(cls, metadata: dict[str, Any]) -> str:
        parts = []
        if metadata.get("perplexity") is not None:
            parts.append(f"perplexity {metadata['perplexity']:.2f}")
        if metadata.get("mean_acc") is not None:
            parts.append(f"mean acc {metadata['mean_acc']:.2%}")
        return ", ".join(parts)


# The reconstruct stage (its own module, it needs the reconstruction package) is registered here, after the
# original pipeline stages, so the stage list keeps its order whichever module is imported first.
from semisparse.jobs.reconstruct import SUMMARY, ReconstructStage, ReconstructStageConfig  # noqa: E402

register("stage", "reconstruct", ReconstructStageConfig, summary=SUMMARY)(ReconstructStage)
