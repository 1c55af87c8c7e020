"""semisparse: accurate 2:4 (and N:M) semi-structured sparse LLMs.

The Python API mirrors the CLI: `load_model`, `prune`, `perplexity`, `sparsity_report`, and the
end-to-end jobs in `semisparse.workflows`.
"""

from semisparse.errors import SemisparseError
from semisparse.evaluation.perplexity import perplexity
from semisparse.models import find_targets, load_model, load_tokenizer
from semisparse.nm import NMPattern, parse_pattern
from semisparse.pruning import prune
from semisparse.report import sparsity_report

__all__ = [
    "NMPattern",
    "SemisparseError",
    "find_targets",
    "load_model",
    "load_tokenizer",
    "parse_pattern",
    "perplexity",
    "prune",
    "sparsity_report",
]
