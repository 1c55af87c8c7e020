"""Sequential block-by-block calibration, as in the SparseGPT and Wanda papers.

Calibration samples are embedded once, then pushed through the decoder one block at a time: the inputs
of the block's target layers feed per-layer accumulators (through forward hooks), the block is pruned,
and the *pruned* block recomputes the hidden states that become the next block's inputs. Only one
block, the hidden states of all samples at one depth, and the accumulators of one block are live, so a
model larger than the accelerator can be pruned with `device` set and the model left on the CPU.

Three things keep the calibration close to the cost of the block forwards themselves:

- layers that read the very same input tensor in a forward (q/k/v, gate/up) share one accumulator when
  their pruners can (`adopt_statistics`), found by tensor identity in the first forward and checked in
  every later one, so it needs no knowledge of the architecture and gives the same bits;
- several samples go through a block per forward (`TOKENS_PER_FORWARD`), their hooked inputs still fed to
  the accumulators one sample at a time, in order, so the statistics are summed exactly as before;
- an optional `PruneTimings` records where the time went (capture, the forwards feeding the statistics,
  the statistics, the per-layer algorithm, the forwards producing the next inputs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from semisparse.errors import SemisparseError
from semisparse.modules import decoder_blocks


class LayerPruner(Protocol):
    """What the engine needs from a per-layer algorithm: fed by a forward hook, then asked to prune.

    A pruner whose statistics depend only on its inputs may also define `adopt_statistics(leader)`: the
    engine then feeds only one of the layers that receive the very same input tensor (q/k/v, gate/up), and
    before pruning hands that one (of the same pruner type) to the others.
    """

    def add_batch(self, inp: Tensor) -> None: ...

    def prune(self) -> None: ...


# Calibration samples per block forward: as many as fit in this many tokens, at least one. On CPU the
# outputs are the same bits as one sample at a time (tests/test_engine_speed.py checks it); hooked inputs
# are fed to the accumulators one sample at a time either way.
TOKENS_PER_FORWARD = 4096


@dataclass
class PruneTimings:
    """Where the time of one sequential calibration went, in seconds; filled when passed to the engine.

    `feed_forwards`: the block forwards whose layer inputs feed the statistics, without the hooks, whose
    own time is `statistics` (e.g. the Hessians); `layer_updates`: the per-layer algorithm (SparseGPT's
    column sweeps); `next_forwards`: the pruned blocks' forwards that make the next block's inputs;
    `other`: the rest (moving blocks between devices, bookkeeping). On a GPU each reading synchronizes.
    """

    capture: float = 0.0
    feed_forwards: float = 0.0
    statistics: float = 0.0
    layer_updates: float = 0.0
    next_forwards: float = 0.0
    total: float = 0.0
    blocks: int = 0
    samples_per_forward: int = 0
    shared_statistics: int = 0  # targets that used the statistics of another target with the same input
    masked_blocks: int = 0  # blocks called with an explicit attention mask (no causal fast path)

    @property
    def block_forwards(self) -> float:
        return self.feed_forwards + self.next_forwards

    @property
    def other(self) -> float:
        parts = self.capture + self.feed_forwards + self.statistics + self.layer_updates + self.next_forwards
        return max(0.0, self.total - parts)

    @property
    def ratio(self) -> float | None:
        """Total time over the time of the block forwards alone."""
        return self.total / self.block_forwards if self.block_forwards > 0 else None

    def to_dict(self) -> dict[str, Any]:
        derived = {"block_forwards": self.block_forwards, "other": self.other, "ratio": self.ratio}
        return {**asdict(self), **derived}


def _clock(enabled: bool) -> Callable[[], float]:
    """`time.perf_counter`, synchronizing CUDA first; a constant 0 when nobody asked for timings."""
    if not enabled:
        return lambda: 0.0

    def now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


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


def _explicit_attention_mask(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a block gets an attention mask tensor; without one, SDPA takes its fast `is_causal` path."""
    named = any("mask" in key and isinstance(value, Tensor) for key, value in kwargs.items())
    square = any(isinstance(a, Tensor) and a.dim() == 4 and a.shape[-1] == a.shape[-2] for a in args)
    return named or square


def run_sequential(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    make_pruner: Callable[[str, nn.Module], LayerPruner],
    calibration_ids: Tensor,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "pruning",
    timings: PruneTimings | None = None,
    samples_per_forward: int | None = None,
    share_statistics: bool = True,
) -> None:
    """Prune `targets` block by block, calibrating each block on the outputs of the pruned blocks before it.

    `device` None runs everything where the model lives; otherwise the embeddings (and whatever else
    sits outside the decoder blocks, but the LM head) go to `device` for the capture, and each block goes
    there only while it is processed. The model ends where it started. `timings`, if given, is filled
    with where the time went; `samples_per_forward` None fits `TOKENS_PER_FORWARD`; `share_statistics`
    False gives every target its own accumulator even when targets read the same input.
    """
    now = _clock(timings is not None)
    started = now()
    device = torch.device(device) if device is not None else None
    blocks = decoder_blocks(model)
    grouped = _targets_by_block(blocks, targets)
    needed = [b for b, group in enumerate(grouped) if group]
    if not needed:
        return
    last_block = needed[-1]
    times = timings if timings is not None else PruneTimings()

    with torch.no_grad(), _calibration_mode(model):
        capture = _capture_block_inputs(model, blocks, calibration_ids, last_block, device)
        hidden = capture.hidden
        capture.hidden = None
        n_samples, seqlen = hidden.shape[0], hidden.shape[1]
        per_forward = samples_per_forward or max(1, TOKENS_PER_FORWARD // max(1, seqlen))
        chunks = [(start, min(start + per_forward, n_samples)) for start in range(0, n_samples, per_forward)]
        times.samples_per_forward = min(per_forward, n_samples)
        times.capture += now() - started
        for b in tqdm(range(last_block + 1), desc=desc, disable=not progress, unit="block"):
            block = blocks[b]
            args, kwargs = capture.block_args[b]
            times.blocks += 1
            times.masked_blocks += _explicit_attention_mask(args, kwargs)
            home = _first_device(block)
            if device is not None:
                block.to(device)
            try:
                share = share_statistics
                while True:
                    try:
                        calibrate = (block, grouped[b], make_pruner, hidden, args, kwargs, chunks, times, now)
                        _calibrate_and_prune(*calibrate, share=share)
                        break
                    except _SharingMismatch:  # a target's input was shared in one forward, not in another
                        share = False
                    except _NotBatchable:  # a target's input does not split by sample: one at a time
                        chunks = [(start, start + 1) for start in range(n_samples)]
                        times.samples_per_forward = 1
                if b < last_block:
                    begin = now()
                    block_device = _first_device(block) or hidden.device
                    for start, end in chunks:
                        out = _block_output(block(hidden[start:end].to(block_device), *args, **kwargs))
                        hidden[start:end] = out.to(hidden.device)
                    times.next_forwards += now() - begin
            finally:
                if device is not None and home is not None:
                    block.to(home)
    times.total += now() - started


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
    timings: PruneTimings | None = None,
) -> None:
    """Run a layer algorithm on every target: sequentially calibrated when it gets calibration ids,
    else directly, layer by layer (a data-free pruner or quantizer never sees an input)."""
    if calibration_ids is not None:
        run_sequential(model, targets, make_pruner, calibration_ids, device, progress, desc, timings)
        return
    with torch.no_grad():
        for name, module in targets.items():
            make_pruner(name, module).prune()


class _SharingMismatch(Exception):
    """A target that shared another's input in the first forward got a different one in a later forward."""


class _NotBatchable(Exception):
    """A target's input in a batched forward cannot be split back into the samples' own inputs."""


def _per_sample(inp: Tensor, batch: int, seqlen: int) -> list[Tensor]:
    """A hooked input of a `batch`-sample forward as the inputs a one-sample forward would have given.

    [batch, ...] splits along the batch; [batch * seqlen, in] (a block that flattens the tokens, as OPT
    does) into consecutive row blocks. Anything else (e.g. tokens routed to an expert) cannot be split.
    """
    if batch == 1:
        return [inp]
    if inp.dim() > 2 and inp.shape[0] == batch:
        return list(inp.split(1))
    if inp.dim() == 2 and inp.shape[0] == batch * seqlen:
        return list(inp.split(seqlen))
    raise _NotBatchable


def _storage_key(tensor: Tensor) -> tuple[Any, ...]:
    """Equal keys of live tensors: the same memory viewed the same way (same values, if `_version` agrees)."""
    return (
        tensor.device,
        tensor.dtype,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


class _InputSharing:
    """Which targets of a block skip their own accumulation because another got the very same input.

    In the first forward a target whose input is the tensor an earlier target got in the same forward
    (same memory, view and version) follows that target, if their pruners can share (same type, with
    `adopt_statistics`). Every forward then checks that each follower got its leader's input, as often as
    the leader did. The inputs seen are held until the forward ends, so freed memory reused by a later
    tensor can never pass for the same input.
    """

    def __init__(self, pruners: Mapping[str, LayerPruner], enabled: bool) -> None:
        self.pruners = pruners
        self.enabled = enabled
        self.leader: dict[str, str] = {}
        self._own: set[str] = set()
        self._first_forward = True
        self._seen: dict[tuple[Any, ...], tuple[Tensor, int, str]] = {}
        self._calls: dict[str, int] = {}

    def _can_share(self, leader: str, follower: str) -> bool:
        a, b = self.pruners[leader], self.pruners[follower]
        return type(a) is type(b) and callable(getattr(b, "adopt_statistics", None))

    def follows(self, name: str, inp: Tensor) -> bool:
        """Whether `name`'s input in this call is left to its leader (raises on a broken sharing)."""
        if not self.enabled:
            return False
        self._calls[name] = self._calls.get(name, 0) + 1
        key = _storage_key(inp)
        seen = self._seen.get(key)
        first = seen[2] if seen is not None and seen[1] == inp._version else None
        if first is None:
            self._seen[key] = (inp, inp._version, name)
        if name in self.leader:
            if first != self.leader[name]:
                raise _SharingMismatch(name)
            return True
        new = self._first_forward and name not in self._own
        if new and first is not None and first != name and self._can_share(first, name):
            self.leader[name] = first
            return True
        self._own.add(name)
        return False

    def end_forward(self) -> None:
        if self.enabled:
            for follower, leader in self.leader.items():
                if self._calls.get(follower, 0) != self._calls.get(leader, 0):
                    raise _SharingMismatch(follower)
        self._first_forward = False
        self._seen.clear()
        self._calls.clear()


def _calibrate_and_prune(
    block: nn.Module,
    group: Mapping[str, nn.Module],
    make_pruner: Callable[[str, nn.Module], LayerPruner],
    hidden: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chunks: list[tuple[int, int]],
    times: PruneTimings,
    now: Callable[[], float],
    share: bool = True,
) -> None:
    """Feed every sample through the block with hooks on its targets, then prune them."""
    if not group:
        return
    pruners = {name: make_pruner(name, module) for name, module in group.items()}
    sharing = _InputSharing(pruners, share)
    state = {"batch": 1, "statistics": 0.0}

    seqlen = hidden.shape[1]

    def hook(name: str, inp: Tensor) -> None:
        begin = now()
        if not sharing.follows(name, inp):
            for sample in _per_sample(inp, state["batch"], seqlen):  # summed as without batching
                pruners[name].add_batch(sample)
        state["statistics"] += now() - begin

    handles = [
        module.register_forward_hook(lambda _m, inputs, _out, n=name: hook(n, inputs[0]))
        for name, module in group.items()
    ]
    block_device = _first_device(block) or hidden.device
    begin = now()
    try:
        for start, end in chunks:
            state["batch"] = end - start
            block(hidden[start:end].to(block_device), *args, **kwargs)
            sharing.end_forward()
    finally:
        for handle in handles:
            handle.remove()
        times.statistics += state["statistics"]
        times.feed_forwards += now() - begin - state["statistics"]
    begin = now()
    followers: dict[str, list[str]] = {}
    for follower, leader in sharing.leader.items():
        while leader in sharing.leader:
            leader = sharing.leader[leader]
        pruners[follower].adopt_statistics(pruners[leader])  # type: ignore[attr-defined]
        followers.setdefault(leader, []).append(follower)
    times.shared_statistics += len(sharing.leader)
    for name in list(pruners):
        pruner = pruners.get(name)
        together = getattr(pruner, "prune_together", None)
        if pruner is None or (together is not None and name in sharing.leader):
            continue  # pruned in its leader's sweep
        del pruners[name]
        if together is not None and name in followers:
            together([pruners.pop(follower) for follower in followers[name]])
        else:
            pruner.prune()
    times.layer_updates += now() - begin
