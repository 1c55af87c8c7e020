"""What every pruner config shares: the target sparsity, as an N:M pattern or an unstructured ratio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.nm import NMPattern
from semisparse.settings import Settings, setting

DEFAULT_PATTERN = "2:4"


@dataclass
class PrunerConfig(Settings):
    """Exactly one of `pattern` and `sparsity`; with neither, the pattern is 2:4."""

    owner: ClassVar[str] = "pruner"

    pattern: str | None = setting(None, "N:M pattern along the input dimension (default 2:4 unless sparsity)")
    sparsity: float | None = setting(None, "unstructured sparsity per row instead of N:M, e.g. 0.5")

    def check(self) -> None:
        if self.pattern is not None and self.sparsity is not None:
            raise SemisparseError("give exactly one of `pattern` (e.g. 2:4) and `sparsity` (e.g. 0.5)")
        if self.pattern is None and self.sparsity is None:
            self.pattern = DEFAULT_PATTERN
        if self.pattern is not None:
            self.pattern = str(nm.parse_pattern(self.pattern))
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise SemisparseError(
                f"`sparsity` {self.sparsity} is outside (0, 1): use e.g. 0.5 for half of the weights"
            )

    @property
    def nm_pattern(self) -> NMPattern | None:
        return nm.parse_pattern(self.pattern) if self.pattern is not None else None

    @property
    def target(self) -> str:
        """The sparsity as a person reads it: `2:4` or `50%`."""
        return self.pattern if self.pattern is not None else f"{self.sparsity:.0%}"
