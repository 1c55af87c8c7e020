"""Block-wise reconstruction of a pruned model against its dense model, with optional local mask learning.

`reconstruct(dense, sparse, ReconstructConfig(...), calibration_ids, targets, pattern)` trains the sparse
model's kept weights in place, block by block (`core`); `blocks` says where each family's attention and MLP
sub-blocks start and end. The job with its work directory, resumption and output is
`semisparse.jobs.reconstruct` (the `reconstruct` stage and command).
"""

from semisparse.reconstruction.blocks import SubBlock, sub_blocks
from semisparse.reconstruction.config import GRANULARITIES, ReconstructConfig
from semisparse.reconstruction.core import Reconstructor, lr_hint, reconstruct

__all__ = [
    "GRANULARITIES",
    "ReconstructConfig",
    "Reconstructor",
    "SubBlock",
    "lr_hint",
    "reconstruct",
    "sub_blocks",
]
