"""Data-parallel training under `torchrun`: process group, gradient averaging, FSDP2 sharding.

Launched by `torchrun --nproc-per-node K` (which sets RANK / WORLD_SIZE / LOCAL_RANK), every process
takes its own slice of each global batch. On CPU (gloo) and on GPUs without `--fsdp` each process holds
the full model and gradients are averaged with one all-reduce per optimizer step (after gradient
accumulation, so accumulation costs no communication). With `--fsdp` on GPUs every decoder block and then
the root are wrapped by FSDP2 (`fully_shard`), which shards weights, gradients and optimizer state along
dim 0 (the output rows) and averages gradients itself.

Row sharding and N:M masks: N:M groups run along the input dimension, inside one row, so a mask computed
on a shard of rows is exactly the rows' part of the mask of the full matrix. Mask updates may therefore
run on each process's local shard without any communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semisparse.errors import SemisparseError
from semisparse.modules import decoder_blocks

_BUCKET_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | None) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun and pick this process's device."""
    wants_cuda = (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise SemisparseError(f"device {device} requested but CUDA is not available; set `device` to cpu")
    if not launched_by_torchrun():
        return Distributed(), torch.device(device or ("cuda" if wants_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
        owns = True
    if wants_cuda:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    info = Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns)
    return info, chosen


def teardown(info: Distributed) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Distributed) -> None:
    if info.active:
        dist.barrier()


def broadcast_module(module: nn.Module, info: Distributed) -> None:
    """Make every rank start from rank 0's weights and buffers (masks, logits, ...)."""
    if not info.active or info.world_size == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[nn.Parameter], info: Distributed) -> None:
    """Average gradients over ranks in flat buckets (one all-reduce per bucket, not per tensor)."""
    if not info.active or info.world_size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for grad in grads:
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for group in buckets.values():
        start = 0
        while start < len(group):
            chunk, size = [], 0
            while start < len(group) and (not chunk or size + group[start].numel() <= _BUCKET_ELEMENTS):
                chunk.append(group[start])
                size += group[start].numel()
                start += 1
            flat = torch.cat([g.reshape(-1) for g in chunk])
            dist.all_reduce(flat)
            flat /= info.world_size
            offset = 0
            for grad in chunk:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def mean_over_ranks(value: float, info: Distributed, device: torch.device) -> float:
    if not info.active or info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def any_rank(flag: bool, info: Distributed, device: torch.device) -> bool:
    """True on every rank if it is true on any (a stop request must stop all ranks at the same step)."""
    if not info.active or info.world_size == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any, info: Distributed) -> list[Any]:
    """One object per rank, on every rank (e.g. each rank's RNG state for the checkpoint)."""
    if not info.active or info.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_model(model: nn.Module, info: Distributed, device: torch.device) -> None:
    """FSDP2: shard each decoder block, then the root (embeddings, final norm, LM head)."""
    if not info.active:
        raise SemisparseError("`fsdp` shards across processes: launch with torchrun --nproc-per-node K")
    if device.type != "cuda":
        raise SemisparseError("`fsdp` needs CUDA GPUs; on CPU turn `fsdp` off (gradients are all-reduced)")
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Under FSDP2, skip the reduce-scatter on all but the last micro-batch of an accumulation."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (collective under FSDP: call on every rank)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, sharded: bool
) -> None:
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 DTensor (a plain tensor is returned as is)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
