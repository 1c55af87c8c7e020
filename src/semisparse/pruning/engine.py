"""Sequential block-by-block calibration, as in the SparseGPT and Wanda papers.

Calibration samples are embedded once, then pushed through the decoder one block at a time: the inputs
of the block's target layers feed per-layer accumulators (through forward hooks), the block is pruned,
and the *pruned* block recomputes the hidden states that become the next block's inputs. Only one
block, the hidden states of all samples at one depth, and the accumulators of one block are live, so a
model larger than the accelerator can be pruned with `device` set and the model left on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from semisparse.errors import SemisparseError
from semisparse.modules import decoder_blocks


class LayerPruner(Protocol):
    """What the engine needs from a per-layer algorithm: fed by a forward hook, then asked to prune."""

    def add_batch(self, inp: Tensor) -> None: ...

    def prune(self) -> None: ...


class _StopForward(Exception):
    """Raised by the block catcher once it has what it needs, so the rest of the model never runs."""


@dataclass
class _Capture:
    """What the model passes to its blocks: per-sample hidden states, and per-block extra arguments.

    The extra arguments (attention mask, position ids, rotary embeddings, ...) depend only on the sequence
    length, which every calibration sample shares, so they are recorded once, from the first sample. They
    are recorded for every block, not just block 0, because some models give layers different masks
    (e.g. sliding-window layers); the recorded tensors are shared, so this costs no memory.
    """

    n_samples: int
    last_block: int
    sample: int = 0
    hidden: Tensor | None = None
    block_args: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def store_hidden(self, hidden: Tensor) -> None:
        """Keep one sample's block-0 input in a preallocated [n_samples, seqlen, hidden] tensor."""
        if self.hidden is None:
            self.hidden = hidden.new_empty((self.n_samples, *hidden.shape[1:]))
        self.hidden[self.sample] = hidden[0]


class _BlockCatcher(nn.Module):
    """Stands in for a decoder block during capture: records its inputs and returns them unchanged.

    The wrapped block is kept out of the module tree, so moving the model around does not move it, and
    its attributes stay readable (some models read e.g. `layer.attention_type` in their loop).
    """

    def __init__(self, block: nn.Module, index: int, capture: _Capture) -> None:
        super().__init__()
        self.__dict__["_wrapped"] = block
        self.__dict__["_index"] = index
        self.__dict__["_capture"] = capture

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        capture: _Capture = self.__dict__["_capture"]
        index: int = self.__dict__["_index"]
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if index == 0:
            capture.store_hidden(hidden.detach())
            if capture.sample > 0:
                raise _StopForward
        capture.block_args[index] = (rest, kwargs)
        if index == capture.last_block:
            raise _StopForward
        return hidden


def _block_output(output: Any) -> Tensor:
    """Hidden state out of a decoder block's return value (a tensor, or a tuple / list starting with it)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise SemisparseError(f"unsupported decoder block output of type {type(output).__name__}")


def _first_device(module: nn.Module) -> torch.device | None:
    """Device of the module's first parameter or buffer."""
    for tensor in chain(module.parameters(), module.buffers()):
        return tensor.device
    return None


_TensorHome = tuple[nn.Module, str, torch.device]


def _move_tensor(module: nn.Module, name: str, device: torch.device) -> None:
    """Move one parameter or buffer; parameters keep their identity, so tied weights stay tied."""
    tensor = getattr(module, name)
    if isinstance(tensor, nn.Parameter):
        tensor.data = tensor.data.to(device)
    else:
        setattr(module, name, tensor.to(device))


def _move_outside_blocks(model: nn.Module, skip: list[nn.Module], device: torch.device) -> list[_TensorHome]:
    """Move the model's tensors to `device`, except those of `skip`'s subtrees; returns where they were."""
    skipped = {id(m) for root in skip for m in root.modules()}
    seen: set[int] = set()
    homes: list[_TensorHome] = []
    for module in model.modules():
        if id(module) in skipped:
            continue
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in own:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            homes.append((module, name, tensor.device))
            _move_tensor(module, name, device)
    return homes


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV cache while calibrating; the caller's settings come back afterwards."""
    training = {module: module.training for module in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        for module, mode in training.items():
            module.training = mode


def _capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration_ids: Tensor,
    last_block: int,
    device: torch.device | None,
) -> _Capture:
    """Run each sample (batch 1) up to block 0, keeping its hidden state, and what blocks 0..last get."""
    capture = _Capture(n_samples=calibration_ids.shape[0], last_block=last_block)
    originals = list(blocks)
    homes: list[_TensorHome] = []
    try:
        for index, block in enumerate(originals):
            blocks[index] = _BlockCatcher(block, index, capture)
        if device is not None:
            lm_head = model.get_output_embeddings()
            homes = _move_outside_blocks(model, [lm_head] if isinstance(lm_head, nn.Module) else [], device)
        input_device = device if device is not None else model.get_input_embeddings().weight.device
        for sample in range(calibration_ids.shape[0]):
            capture.sample = sample
            try:
                model(input_ids=calibration_ids[sample : sample + 1].to(input_device), use_cache=False)
            except _StopForward:
                continue
            raise SemisparseError(
                f"the model's forward never reached decoder block {last_block}: "
                "this architecture is not supported"
            )
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
        for module, name, original in homes:
            _move_tensor(module, name, original)
    return capture


def _targets_by_block(blocks: nn.ModuleList, targets: Mapping[str, nn.Module]) -> list[dict[str, nn.Module]]:
    """Split the targets over the decoder blocks that contain them."""
    owner = {id(m): b for b, block in enumerate(blocks) for m in block.modules()}
    grouped: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name, module in targets.items():
        if id(module) not in owner:
            raise SemisparseError(f"{name} is not inside a decoder block: leave it out with `exclude`")
        grouped[owner[id(module)]][name] = module
    return grouped


def run_sequential(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    make_pruner: Callable[[str, nn.Module], LayerPruner],
    calibration_ids: Tensor,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "pruning",
) -> None:
    """Prune `targets` block by block, calibrating each block on the outputs of the pruned blocks before it.

    `device` None runs everything where the model lives; otherwise the embeddings (and whatever else
    sits outside the decoder blocks, but the LM head) go to `device` for the capture, and each block goes
    there only while it is processed. The model ends where it started.
    """
    device = torch.device(device) if device is not None else None
    blocks = decoder_blocks(model)
    grouped = _targets_by_block(blocks, targets)
    needed = [b for b, group in enumerate(grouped) if group]
    if not needed:
        return
    last_block = needed[-1]

    with torch.no_grad(), _calibration_mode(model):
        capture = _capture_block_inputs(model, blocks, calibration_ids, last_block, device)
        hidden = capture.hidden
        capture.hidden = None
        for b in tqdm(range(last_block + 1), desc=desc, disable=not progress, unit="block"):
            block = blocks[b]
            args, kwargs = capture.block_args[b]
            home = _first_device(block)
            if device is not None:
                block.to(device)
            try:
                _calibrate_and_prune(block, grouped[b], make_pruner, hidden, args, kwargs)
                if b < last_block:
                    block_device = _first_device(block) or hidden.device
                    for s in range(hidden.shape[0]):
                        out = _block_output(block(hidden[s : s + 1].to(block_device), *args, **kwargs))
                        hidden[s] = out[0].to(hidden.device)
            finally:
                if device is not None and home is not None:
                    block.to(home)


def check_calibration_ids(name: str, calibration_ids: Tensor | None) -> Tensor:
    if calibration_ids is None:
        raise SemisparseError(
            f"{name} needs calibration data: pass `calibration_ids` [n_samples, seqlen] of token ids"
        )
    if calibration_ids.dim() != 2 or calibration_ids.shape[0] == 0 or calibration_ids.shape[1] == 0:
        raise SemisparseError(
            f"`calibration_ids` must be [n_samples, seqlen] with at least one sample and one token, "
            f"got shape {tuple(calibration_ids.shape)}: pass more calibration samples"
        )
    if calibration_ids.is_floating_point() or calibration_ids.is_complex():
        raise SemisparseError(
            "`calibration_ids` must hold integer token ids: tokenize the calibration text first"
        )
    return calibration_ids


def run_layerwise(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    make_pruner: Callable[[str, nn.Module], LayerPruner],
    calibration_ids: Tensor | None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "pruning",
) -> None:
    """Run a layer algorithm on every target: sequentially calibrated when it gets calibration ids,
    else directly, layer by layer (a data-free pruner or quantizer never sees an input)."""
    if calibration_ids is not None:
        run_sequential(model, targets, make_pruner, calibration_ids, device, progress, desc)
        return
    with torch.no_grad():
        for name, module in targets.items():
            make_pruner(name, module).prune()


def _calibrate_and_prune(
    block: nn.Module,
    group: Mapping[str, nn.Module],
    make_pruner: Callable[[str, nn.Module], LayerPruner],
    hidden: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Feed every sample through the block with hooks on its targets, then prune them."""
    if not group:
        return
    pruners = {name: make_pruner(name, module) for name, module in group.items()}
    handles = [
        module.register_forward_hook(lambda _m, inputs, _out, p=pruners[name]: p.add_batch(inputs[0]))
        for name, module in group.items()
    ]
    block_device = _first_device(block) or hidden.device
    try:
        for s in range(hidden.shape[0]):
            block(hidden[s : s + 1].to(block_device), *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name in list(pruners):
        pruners.pop(name).prune()
