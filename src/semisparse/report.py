"""Sparsity reports: what fraction of each target layer is zero, and whether it really follows N:M.

With a pattern N:M, each layer gets `follows_pattern` (no group of M has more than N non-zeros: what the
hardware needs, the one rule a violation breaks) and `exact` (every group has exactly N non-zeros). A layer
that follows the pattern but is not exact keeps fewer than N somewhere: kept weights that are zero (after
quantization, say) or groups pruned further, down to a whole layer of zeros; `semisparse info` prints it
as "ok (at most N)" rather than "ok", and counts such layers, but it is no violation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from semisparse import nm
from semisparse.modules import find_targets, layer_filter, weight_matrix


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    sparsity: float
    follows_pattern: bool | None
    exact: bool | None = None  # every group of M has exactly N non-zeros (None: no pattern checked)


@dataclass(frozen=True)
class SparsityReport:
    pattern: str | None
    layers: list[LayerSparsity]

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all target weights, weighted by layer size."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / total if total else 0.0

    @property
    def violations(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.follows_pattern is False]

    @property
    def at_most(self) -> list[str]:
        """Layers that follow the pattern with fewer than N non-zeros in some group (not violations)."""
        return [layer.name for layer in self.layers if layer.follows_pattern and layer.exact is False]

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "overall_sparsity": self.overall_sparsity,
            "violations": self.violations,
            "at_most": self.at_most,
            "layers": [asdict(layer) for layer in self.layers],
        }


@torch.no_grad()
def sparsity_report(
    model: torch.nn.Module,
    pattern: nm.NMPattern | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> SparsityReport:
    """Measure every target layer; with a pattern, verify each one against it."""
    layers = []
    for name, module in find_targets(model, layer_filter(include, exclude)).items():
        weight = weight_matrix(module)
        follows = exact = None
        if pattern is not None:
            follows = nm.is_nm(weight, pattern.n, pattern.m)
            exact = follows and nm.is_nm(weight, pattern.n, pattern.m, exact=True)
        layers.append(LayerSparsity(name, tuple(weight.shape), nm.sparsity(weight), follows, exact))
    return SparsityReport(str(pattern) if pattern else None, layers)
