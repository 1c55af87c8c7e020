"""What the trainers that read calibration data (AST, MaskLLM) share: their settings as a `Calibration`.

Their configs keep flat fields (`calibration`, `calibration_nsamples`, `calibration_seqlen`), as recipes
write them; loading goes through `semisparse.calibration` and the pruning API, whose messages name the
`Calibration` fields. `calibration_settings` renames those to the trainer's own fields, so an error says
which setting to change (`calibration_seqlen`, not `seqlen`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from semisparse.calibration import Calibration
from semisparse.errors import SemisparseError

# `Calibration` field -> the trainer setting that holds it (the seed is the run's own `seed`).
CALIBRATION_FIELDS = {
    "source": "calibration",
    "nsamples": "calibration_nsamples",
    "seqlen": "calibration_seqlen",
}
_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def calibration_of(settings: Any, seed: int) -> Calibration:
    """The `Calibration` a trainer's flat calibration settings describe, drawn with the run's seed."""
    with calibration_settings():
        return Calibration(
            **{field: getattr(settings, name) for field, name in CALIBRATION_FIELDS.items()}, seed=seed
        )


@contextmanager
def calibration_settings() -> Iterator[None]:
    """Re-raise errors from calibration and one-shot pruning with the trainer's setting names."""
    try:
        yield
    except SemisparseError as err:
        message = _PARAMETER.sub(lambda m: f"`{CALIBRATION_FIELDS.get(m.group(1), m.group(1))}`", str(err))
        err.args = (message,)
        raise
