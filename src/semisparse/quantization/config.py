"""What every weight quantizer's config shares: bits, scale groups and the grid's symmetry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from semisparse.settings import Settings, setting


@dataclass
class QuantizerConfig(Settings):
    """Asymmetric int4 with a float16 scale and uint8 zero point per row and group of 128 by default."""

    owner: ClassVar[str] = "quantizer"

    bits: Literal[4, 8] = setting(4, "bits per kept weight")
    group_size: int | None = setting(
        128, "dense input columns per scale group; none = one grid per row", minimum=1
    )
    symmetric: bool = setting(False, "symmetric grid without zero point")
