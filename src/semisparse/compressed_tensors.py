"""compressed-tensors' `sparse-24-bitmask` checkpoints: writing them, and reading them without the library.

`semisparse compress --format compressed-tensors` writes what compressed-tensors' own `ModelCompressor`
writes for an unquantized 2:4 model (checked against a directory the library wrote, kept in
`tests/fixtures/compressed_tensors_llama/`): a transformers model directory whose `model.safetensors`
(header metadata `{"format": "pt"}`) stores every 2:4 Linear layer `<layer>` (weight [out, in]) as

- `<layer>.shape`: int64 [2, 1], the dense (out, in);
- `<layer>.bitmask`: uint8 [out, ceil(in / 8)], `numpy.packbits(mask, axis=-1, bitorder="little")`: bit k of
  byte b in row r is set when weight (r, 8b + k) is kept; exactly 2 per group of 4 (a group with fewer
  non-zeros marks its first zeros, stored as 0);
- `<layer>.compressed`: [out, in / 2] in the weight's dtype, the kept values of each row in column order;

and every other tensor dense under its own name (a tied copy is stored once, as `save_pretrained` does).
`config.json` carries `quantization_config = {"quant_method": "compressed-tensors", "version": ...,
"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": ...,
"targets": ["Linear"], "ignore": [<every Linear layer not stored 2:4>], ...}, "transform_config": {}}`,
plus `rope_theta` / `rope_scaling` beside transformers 5's `rope_parameters`, because transformers 4
ignores `rope_parameters` and would silently run with its default RoPE base.

Who loads it: compressed-tensors 0.14.0.1 (the last release with `Sparse24BitMaskCompressor`; 0.15.0 removed
it) through `ModelCompressor.from_pretrained(dir).decompress(dir, model)`, and transformers 4.57.6's
`AutoModelForCausalLM.from_pretrained(dir)` with that compressed-tensors installed (plus accelerate); both
verified bit-exact. Transformers 5 and later compressed-tensors cannot load it; `semisparse.load_model`
reads it (and library-written ones) itself, as does every semisparse command.

Only unquantized models: compressed-tensors stores quantized 2:4 models in other formats, which semisparse
neither writes nor reads. GPT-2 `Conv1D` layers are not `Linear`, so the library would not treat them.
"""

from __future__ import annotations

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

FORMAT = "compressed-tensors"
SPARSITY_FORMAT = "sparse-24-bitmask"
# The compressed-tensors release whose layout this is (written as `version`; the library ignores it on load).
LIBRARY_VERSION = "0.14.0.1"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARAMS = ("shape", "bitmask", "compressed")


def _config_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def compression_config(path: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` of a compressed-tensors model directory, or None for any other path."""
    root = Path(path).expanduser()
    data = _config_json(root) if root.is_dir() else None
    block = (data or {}).get("quantization_config")
    if isinstance(block, dict) and block.get("quant_method") == FORMAT:
        return block
    return None


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """Whether `path` is a model directory whose config.json says compressed-tensors."""
    return compression_config(path) is not None


def _is_linear(module: nn.Module) -> bool:
    """compressed-tensors' "Linear" target: any class of that name in the module's MRO."""
    return any(cls.__name__ == "Linear" for cls in type(module).__mro__)


def _full_mask(weight: Tensor) -> Tensor:
    return nm.nm_mask((weight != 0).to(torch.uint8), 2, 4)


def _pack(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def _unpack(packed: Tensor, rows: int, cols: int) -> Tensor:
    bits = np.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.reshape(rows, cols).astype(bool))


def layer_tensors(layer: str, weight: Tensor) -> dict[str, Tensor]:
    """The three stored tensors of one 2:4 Linear weight [out, in], named as the library names them."""
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    mask = _full_mask(weight)
    return {
        f"{layer}.shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        f"{layer}.bitmask": _pack(mask),
        f"{layer}.compressed": weight[mask].reshape(rows, cols // 2),
    }


def _compressible(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder-block layers whose weights are 2:4 (the ones to store compressed)."""
    found = {}
    for name, module in find_targets(model).items():
        matrix = weight_matrix(module).detach()
        if matrix.shape[1] % 4 == 0 and nm.is_nm(matrix, 2, 4):
            if isinstance(module, Conv1D) or not _is_linear(module):
                raise SemisparseError(
                    f"{name} is a {type(module).__name__} layer, which compressed-tensors does not store "
                    "as 2:4 (only Linear layers): use the semisparse format instead"
                )
            found[name] = module
    return found


def compressed_tensors_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of `model.safetensors` and the `quantization_config` block for `model`."""
    layers = _compressible(model)
    if not layers:
        raise SemisparseError("the model has no 2:4 layers to compress: prune it with --pattern 2:4 first")
    stored: dict[str, Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue  # a tied copy (e.g. lm_head.weight), stored once as save_pretrained does
        seen.add(identity)
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in layers:
            stored.update(layer_tensors(layer, weight_matrix(layers[layer])))
        else:
            stored[key] = tensor.detach().cpu().contiguous()
    params = {id(p): p for p in model.parameters()}.values()
    zeros = sum(int((p == 0).sum()) for p in params)
    ignore = [name for name, module in model.named_modules() if _is_linear(module) and name not in layers]
    block = {
        "quant_method": FORMAT,
        "version": LIBRARY_VERSION,
        "sparsity_config": {
            "format": SPARSITY_FORMAT,
            "global_sparsity": zeros / max(1, sum(p.numel() for p in params)),
            "ignore": ignore,
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4",
            "targets": ["Linear"],
        },
        "transform_config": {},
    }
    return stored, block


def _transformers4_rope(config: dict[str, Any]) -> None:
    """Add transformers 4's RoPE keys next to transformers 5's `rope_parameters` (4.x ignores the latter)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return
    config["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        config["rope_scaling"] = scaling


def save_compressed_tensors(model: PreTrainedModel, directory: Path) -> None:
    """Write config, generation config and `model.safetensors` of an unquantized 2:4 model to `directory`."""
    stored, block = compressed_tensors_state(model)
    model.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    _transformers4_rope(config)
    config["quantization_config"] = block
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    save_file(stored, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _corrupt(path: Path, what: str) -> SemisparseError:
    return SemisparseError(f"{path} is not a valid compressed-tensors checkpoint ({what})")


def _weight_files(root: Path) -> list[Path]:
    if (root / WEIGHTS_FILE).is_file():
        return [root / WEIGHTS_FILE]
    if (root / INDEX_FILE).is_file():
        try:
            names = sorted(set(json.loads((root / INDEX_FILE).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise _corrupt(root / INDEX_FILE, "unreadable weight_map") from err
        return [root / name for name in names]
    raise _corrupt(root, f"no {WEIGHTS_FILE} or {INDEX_FILE}")


def _read_tensors(root: Path, keys_only: bool = False) -> dict[str, Tensor | None]:
    """Every tensor of the directory's weight files (or only their names, mapped to None)."""
    tensors: dict[str, Tensor | None] = {}
    for file in _weight_files(root):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    tensors[key] = None if keys_only else handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _corrupt(file, first) from err
    return tensors


def _check_supported(root: Path, block: dict[str, Any]) -> str:
    """The sparsity format of an unquantized checkpoint semisparse can read; a one-line error otherwise."""
    if block.get("config_groups"):
        raise SemisparseError(
            f"{root} is a quantized compressed-tensors checkpoint: semisparse reads only unquantized "
            f"{SPARSITY_FORMAT} (or dense) ones; load it with compressed-tensors and transformers instead"
        )
    if block.get("transform_config"):
        raise SemisparseError(f"{root} uses compressed-tensors transforms, which semisparse cannot apply")
    sparsity = block.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense") if isinstance(sparsity, dict) else None
    if fmt not in (SPARSITY_FORMAT, "dense"):
        raise SemisparseError(
            f"{root} uses compressed-tensors format {fmt!r}; semisparse reads {SPARSITY_FORMAT} or dense"
        )
    return fmt


def _decompress(file: Path, layer: str, tensors: dict[str, Tensor]) -> Tensor:
    shape = tensors.pop(f"{layer}.shape").flatten().tolist()
    bitmask, values = tensors.pop(f"{layer}.bitmask"), tensors.pop(f"{layer}.compressed")
    if len(shape) != 2 or shape[1] % 4:
        raise _corrupt(file, f"{layer}.shape is {shape}, expected a 2:4 matrix (out, in)")
    rows, cols = (int(v) for v in shape)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, math.ceil(cols / 8)):
        raise _corrupt(file, f"{layer}.bitmask has shape {tuple(bitmask.shape)} for a {rows}x{cols} weight")
    if tuple(values.shape) != (rows, cols // 2):
        expected = (rows, cols // 2)
        raise _corrupt(file, f"{layer}.compressed has shape {tuple(values.shape)}, expected {expected}")
    mask = _unpack(bitmask, rows, cols)
    if not bool((mask.reshape(rows, -1, 4).sum(-1) == 2).all()):
        raise _corrupt(file, f"{layer}.bitmask does not keep exactly 2 of every 4 weights")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense


def decompressed_state(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict stored in a compressed-tensors directory (tied copies not repeated)."""
    root = Path(path).expanduser()
    block = compression_config(root)
    if block is None:
        raise SemisparseError(f"{root} is not a compressed-tensors model directory (see its config.json)")
    fmt = _check_supported(root, block)
    tensors = _read_tensors(root)
    if fmt == "dense":
        return tensors
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith(".compressed")})
    for layer in layers:
        missing = [f"{layer}.{p}" for p in PARAMS if f"{layer}.{p}" not in tensors]
        if missing:
            raise _corrupt(root, f"tensor {missing[0]} is missing")
        tensors[f"{layer}.weight"] = _decompress(root, layer, tensors)
    return tensors


def load_compressed_tensors(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The dense model of a compressed-tensors directory (library-written or ours), in eval mode."""
    root = Path(path).expanduser()
    state = decompressed_state(root)
    config = AutoConfig.from_pretrained(root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model in memory is dense; a later save must not claim otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = model.state_dict()
    owners: dict[tuple[int, int], set[str]] = {}
    for key, tensor in expected.items():
        owners.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), set()).add(key)
    unexpected = sorted(set(state) - set(expected))
    missing = [
        key
        for key, tensor in expected.items()
        if key not in state
        and not owners[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] & set(state)
    ]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise _corrupt(root, f"does not match config.json: {what}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise _corrupt(root, str(err).strip().splitlines()[-1].strip()) from err
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    return model.to(device).eval()


def stored_24_layers(path: str | Path) -> set[str]:
    """Names of the layers a compressed-tensors directory stores in the 2:4 layout (from tensor names)."""
    keys = _read_tensors(Path(path).expanduser(), keys_only=True)
    return {key.removesuffix(".compressed") for key in keys if key.endswith(".compressed")}


def saved_pattern(path: str | Path, model: nn.Module) -> tuple[str | None, list[str]]:
    """The N:M pattern a compressed-tensors directory declares, and the target layers it leaves out.

    For sparse-24-bitmask, the layers left out are the targets not stored in the 2:4 layout; for a dense
    file declaring `sparsity_structure` 2:4, the ones named in `ignore`. (None, []) when nothing is declared.
    """
    sparsity = (compression_config(path) or {}).get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or str(sparsity.get("sparsity_structure")) != "2:4":
        return None, []
    targets = find_targets(model)
    if sparsity.get("format") == SPARSITY_FORMAT:
        stored = stored_24_layers(path)
        return "2:4", [name for name in targets if name not in stored]
    ignore = {str(name) for name in sparsity.get("ignore") or []}
    return "2:4", [name for name in targets if name in ignore]
