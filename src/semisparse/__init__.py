"""semisparse: accurate 2:4 (and N:M) semi-structured sparse LLMs.

The Python API mirrors the CLI: `load_model`, `prune`, `perplexity`, `sparsity_report`, `quantize`,
`size_report`, `accelerate`, the mask files (`save_masks`, `load_masks`, `apply_masks`), and the training
loop in `semisparse.training` with the methods in `semisparse.methods`; `Recipe` chains prune, train,
quantize, compress and eval stages from one YAML file into one directory with one provenance chain.
"""

from semisparse.acceleration import accelerate
from semisparse.compressed import is_compressed_dir, load_compressed
from semisparse.errors import SemisparseError
from semisparse.evaluation.perplexity import perplexity
from semisparse.jobs.recipe import Recipe
from semisparse.maskfiles import apply_masks, load_masks, save_masks
from semisparse.models import load_model, load_tokenizer
from semisparse.modules import find_targets, layer_filter
from semisparse.nm import NMPattern, parse_pattern
from semisparse.pruning import prune
from semisparse.quantization import quantize
from semisparse.report import sparsity_report
from semisparse.sizes import size_report

__all__ = [
    "NMPattern",
    "Recipe",
    "SemisparseError",
    "accelerate",
    "apply_masks",
    "find_targets",
    "is_compressed_dir",
    "layer_filter",
    "load_compressed",
    "load_masks",
    "load_model",
    "load_tokenizer",
    "parse_pattern",
    "perplexity",
    "prune",
    "quantize",
    "save_masks",
    "size_report",
    "sparsity_report",
]
