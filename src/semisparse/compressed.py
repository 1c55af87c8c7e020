"""Compressed 2:4 checkpoints: kept values plus a one-bit-per-weight mask, optionally as int8/int4 codes.

`compressed-tensors` removed its sparse-24-bitmask compressor in 0.15.0 (0.14.0.1 is the last release that
loads such models), and its layout has no room for int4/int8 codes or Conv1D layers, so semisparse keeps its
own file with the same encoding; `semisparse.compressed_tensors` writes and reads the library's layout.

A compressed model directory holds `config.json`, the tokenizer files, `semisparse.json` and
`compressed.safetensors` (deliberately not `model.safetensors`, so plain transformers refuses the directory
instead of loading random weights). In that file, each 2:4 target layer with weight `<w>` (`<layer>.weight`,
always taken in the Linear layout [out, in], i.e. transposed for GPT-2 Conv1D) is stored as:

- `<w>.shape`: int64 [2], the dense (out, in).
- `<w>.bitmask`: uint8 [out, ceil(in / 8)]: bit k (little bit order, bit 0 = least significant) of byte b in
  row r is 1 when weight (r, 8b + k) is kept. Exactly 2 bits are set in every group of 4 (when a group has
  fewer non-zeros, its first zeros are marked kept and stored as values 0).
- Unquantized: `<w>.compressed`: [out, in / 2] in the weight's dtype, the kept values of each row in
  column order. Bit-exact: dense = scatter of these values at the mask's positions, zeros elsewhere.
- Quantized: `<w>.packed`: uint8 [out, in / 2] (int8) or [out, in / 4] (int4: two codes per byte, the
  earlier code in the low nibble), the codes of the kept values in row and column order; `<w>.scales`:
  float16 [out, groups]; `<w>.zeros`: uint8 [out, groups] (asymmetric grids only). The dense weight is
  `(code - zero) * scale` in float32 at kept positions (see `semisparse.quantization.rtn`), exactly the
  values the quantized model computed with.

Every other tensor is stored unchanged under its state-dict name. Tied tensors are stored once. The
safetensors header metadata holds `format` = `semisparse-sparse-24-bitmask`, `format_version` = `1`,
`layers` (JSON: per compressed weight its `dtype`, `transposed`, and `bits`/`group_size`/`symmetric` when
quantized), `aliases` (JSON: dropped tied name -> stored name) and `sha256` (JSON: stored tensor name -> hex
sha256 of its dtype name, its shape as a list, then its raw bytes; see `tensor_sha256`). Loading checks
every stored tensor against `sha256`, so a mask with bits moved (still 2:4) or any altered value is an
error instead of other weights; files written before `sha256` was added load without the check.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.modules import find_targets, weight_matrix
from semisparse.quantization.gridfile import recover_codes
from semisparse.quantization.rtn import SCALE_DTYPE, QuantizedWeight, n_groups

COMPRESSED_FILE = "compressed.safetensors"
FORMAT = "semisparse-sparse-24-bitmask"
FORMAT_VERSION = "1"


def is_compressed_dir(path: str | Path) -> bool:
    """Whether `path` is a model directory in semisparse's compressed format."""
    root = Path(path).expanduser()
    return (root / COMPRESSED_FILE).is_file() and (root / "config.json").is_file()


def full_mask_24(weight: Tensor) -> Tensor:
    """The stored mask: the non-zeros of a 2:4 weight, padded to exactly 2 per group with its first zeros."""
    return nm.nm_mask((weight != 0).to(torch.uint8), 2, 4)


def pack_bitmask(mask: Tensor) -> Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)], little bit order within each byte."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(packed: Tensor, shape: tuple[int, int]) -> Tensor:
    """Inverse of `pack_bitmask`: the bool [rows, cols] mask."""
    bits = np.unpackbits(packed.numpy(), axis=-1, count=shape[1], bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, k] -> bytes; int4 puts two codes per byte, the earlier one in the low nibble."""
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack_codes`: uint8 codes [rows, k]."""
    if bits == 8:
        return packed
    codes = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes[:, :k]


def compressed_tensors_of(
    name: str, weight: Tensor, quantized: QuantizedWeight | None, transposed: bool
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Stored tensors and header entry of one 2:4 weight ([out, in])."""
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    mask = full_mask_24(weight)
    tensors = {
        f"{name}.shape": torch.tensor([rows, cols], dtype=torch.int64),
        f"{name}.bitmask": pack_bitmask(mask),
    }
    info: dict[str, Any] = {"dtype": str(weight.dtype).removeprefix("torch."), "transposed": transposed}
    if quantized is None:
        tensors[f"{name}.compressed"] = weight[mask].reshape(rows, cols // 2)
        return tensors, info
    zeros = None if quantized.zeros is None else quantized.zeros.cpu()
    grid = QuantizedWeight(
        quantized.codes, mask, quantized.scales.cpu(), zeros, quantized.bits, quantized.group_size
    )
    qw = recover_codes(weight, mask, grid)
    tensors[f"{name}.packed"] = pack_codes(qw.codes[mask].reshape(rows, cols // 2), qw.bits)
    tensors[f"{name}.scales"] = qw.scales.to(SCALE_DTYPE).contiguous()
    if qw.zeros is not None:
        tensors[f"{name}.zeros"] = qw.zeros.contiguous()
    info.update(bits=qw.bits, group_size=qw.group_size, symmetric=qw.zeros is None)
    return tensors, info


def tensor_sha256(tensor: Tensor) -> str:
    """Hex sha256 of a tensor's dtype name (`float32`), its shape as a list (`[4, 8]`), then its bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{str(data.dtype).removeprefix('torch.')}{list(data.shape)}".encode())
    digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def compressed_state(
    model: nn.Module, quantized: dict[str, QuantizedWeight] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata of the compressed file for `model` (2:4 targets compressed)."""
    quantized = quantized or {}
    state = model.state_dict()
    modules = {f"{name}.weight": module for name, module in find_targets(model).items()}
    stored: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    owners: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and identity in owners:
            aliases[key] = owners[identity]
            continue
        owners[identity] = key
        module = modules.get(key)
        matrix = weight_matrix(module).detach() if module is not None else None
        if matrix is not None and nm.is_nm(matrix, 2, 4):
            layer = key.removesuffix(".weight")
            transposed = isinstance(module, Conv1D)
            tensors, info = compressed_tensors_of(key, matrix, quantized.get(layer), transposed)
            stored.update(tensors)
            layers[key] = info
        else:
            if key.removesuffix(".weight") in quantized:
                raise SemisparseError(
                    f"{key} is quantized but not 2:4: the compressed format needs 2:4 layers"
                )
            stored[key] = tensor.detach().cpu().contiguous()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": json.dumps(layers),
        "aliases": json.dumps(aliases),
        "sha256": json.dumps({key: tensor_sha256(tensor) for key, tensor in stored.items()}),
    }
    return stored, header


def save_compressed(
    model: PreTrainedModel, directory: Path, quantized: dict[str, QuantizedWeight] | None
) -> None:
    """Write config, generation config and `compressed.safetensors` of `model` into an existing directory."""
    stored, header = compressed_state(model, quantized)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    save_file(stored, str(directory / COMPRESSED_FILE), metadata=header)


def _corrupt(path: Path, what: str) -> SemisparseError:
    return SemisparseError(
        f"{path} is not a valid compressed checkpoint ({what}): re-create it with `semisparse compress`"
    )


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    if header.get("format") != FORMAT:
        raise _corrupt(path, f"format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise SemisparseError(
            f"{path} uses compressed format version {header.get('format_version')}, this semisparse reads "
            f"{FORMAT_VERSION}: upgrade semisparse"
        )
    return tensors, header


def _verify(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Every stored tensor against the header's `sha256` (files without it predate the check).

    Run after the layout checks, which name a missing or misshapen tensor more precisely.
    """
    if "sha256" not in header:
        return
    try:
        expected = json.loads(header["sha256"])
    except json.JSONDecodeError as err:
        raise _corrupt(path, "unreadable sha256 metadata") from err
    if not isinstance(expected, dict):
        raise _corrupt(path, "unreadable sha256 metadata")
    for key in sorted(tensors):
        if key not in expected:
            raise _corrupt(path, f"tensor {key} is not listed in its sha256 metadata: the file was altered")
        if tensor_sha256(tensors[key]) != expected[key]:
            raise _corrupt(path, f"tensor {key} does not match its sha256: the file was altered or damaged")


def _decompress_weight(
    path: Path, name: str, info: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[Tensor, QuantizedWeight | None]:
    """The dense weight (transposed back for Conv1D) of one compressed entry, and its codes if quantized."""
    try:
        rows, cols = (int(v) for v in tensors[f"{name}.shape"].tolist())
        bitmask = tensors[f"{name}.bitmask"]
        if cols % 4 or tuple(bitmask.shape) != (rows, math.ceil(cols / 8)) or bitmask.dtype != torch.uint8:
            raise _corrupt(
                path, f"{name}.bitmask has shape {tuple(bitmask.shape)} for a {rows}x{cols} weight"
            )
        mask = unpack_bitmask(bitmask, (rows, cols))
        if not nm.is_nm(mask, 2, 4, exact=True):
            raise _corrupt(path, f"{name}.bitmask does not keep exactly 2 of every 4 weights")
        kept = cols // 2
        if "bits" not in info:
            values = tensors[f"{name}.compressed"]
            if tuple(values.shape) != (rows, kept):
                raise _corrupt(
                    path, f"{name}.compressed has shape {tuple(values.shape)}, expected {(rows, kept)}"
                )
            dense = torch.zeros(rows, cols, dtype=values.dtype)
            dense[mask] = values.reshape(-1)
            qw = None
        else:
            bits, group_size = int(info["bits"]), info["group_size"]
            packed = tensors[f"{name}.packed"]
            if tuple(packed.shape) != (rows, kept * bits // 8):
                raise _corrupt(path, f"{name}.packed has shape {tuple(packed.shape)} for int{bits} codes")
            scales = tensors[f"{name}.scales"]
            zeros = None if info["symmetric"] else tensors[f"{name}.zeros"]
            groups = (rows, n_groups(cols, group_size))
            if tuple(scales.shape) != groups or (zeros is not None and tuple(zeros.shape) != groups):
                raise _corrupt(path, f"{name}.scales/zeros do not have shape {groups}")
            codes = torch.zeros(rows, cols, dtype=torch.uint8)
            codes[mask] = unpack_codes(packed, bits, kept).reshape(-1)
            qw = QuantizedWeight(codes, mask, scales, zeros, bits, group_size)
            dense = qw.dequantize(getattr(torch, info["dtype"]))
    except KeyError as err:
        raise _corrupt(path, f"tensor {err.args[0]} is missing") from err
    return (dense.t().contiguous() if info["transposed"] else dense), qw


def decompressed_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, QuantizedWeight]]:
    """The dense state dict stored in a compressed directory (or file), tied names restored, and the codes
    of its quantized layers keyed by module name."""
    file = Path(path).expanduser()
    file = file / COMPRESSED_FILE if file.is_dir() else file
    if not file.is_file():
        raise SemisparseError(f"{file} does not exist: pass a directory written by `semisparse compress`")
    tensors, header = _read_tensors(file)
    try:
        layers = json.loads(header.get("layers", "{}"))
        aliases = json.loads(header.get("aliases", "{}"))
    except json.JSONDecodeError as err:
        raise _corrupt(file, "unreadable header metadata") from err
    suffixes = (".shape", ".bitmask", ".compressed", ".packed", ".scales", ".zeros")
    state = {
        key: tensor
        for key, tensor in tensors.items()
        if not (key.endswith(suffixes) and key.rsplit(".", 1)[0] in layers)
    }
    quantized = {}
    for name, info in layers.items():
        state[name], qw = _decompress_weight(file, name, info, tensors)
        if qw is not None:
            quantized[name.removesuffix(".weight")] = qw
    for alias, source in aliases.items():
        if source not in state:
            raise _corrupt(file, f"tied tensor {alias} points at missing {source}")
        state[alias] = state[source]
    _verify(file, tensors, header)
    return state, quantized


def load_compressed(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The dense model of a compressed directory, in eval mode (what `semisparse.load_model` returns)."""
    return load_compressed_with_codes(path, dtype, device)[0]


def load_compressed_with_codes(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, dict[str, QuantizedWeight]]:
    """`load_compressed`, plus the codes and grids of the quantized layers (for re-export and sizes)."""
    root = Path(path).expanduser()
    if not is_compressed_dir(root):
        raise SemisparseError(
            f"{root} is not a compressed model directory (no {COMPRESSED_FILE} + config.json)"
        )
    state, quantized = decompressed_state(root)
    config = AutoConfig.from_pretrained(root)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise _corrupt(root / COMPRESSED_FILE, f"does not match config.json: {what}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _corrupt(root / COMPRESSED_FILE, str(err).strip().splitlines()[-1].strip()) from err
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    return model.to(device).eval(), quantized
