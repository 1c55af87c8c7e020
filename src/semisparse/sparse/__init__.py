"""Sparse training layers: `SparseLinear` (masked forward, straight-through backward) and SLoRB boosting."""

from semisparse.sparse.linear import SparseLinear
from semisparse.sparse.slorb import SLoRB, SLoRBConfig
from semisparse.sparse.swap import (
    SLORB_FILE,
    attach_saved_slorb,
    densify,
    save_slorb,
    slorb_overhead,
    sparse_layers,
    sparsify,
)

__all__ = [
    "SLORB_FILE",
    "SLoRB",
    "SLoRBConfig",
    "SparseLinear",
    "attach_saved_slorb",
    "densify",
    "save_slorb",
    "slorb_overhead",
    "sparse_layers",
    "sparsify",
]
