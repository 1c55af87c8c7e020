"""Datasets from the local mirror (offline, pinned) with the Hugging Face Hub as a fallback.

The mirror lays files out as `<data dir>/<dataset path>/<config>/<split>.jsonl` with the Hub's row schema,
so the same `(path, config, split)` triple works against either source.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from semisparse.errors import SemisparseError

# Calibration sources by name -> (dataset path, config, split or file stem) in the mirror. C4 is not loaded
# from the Hub as a fallback: its "en" config is hundreds of GB, and the papers only use one shard.
CALIBRATION_SOURCES: dict[str, tuple[str, str | None, str]] = {
    "c4": ("allenai/c4", "en", "c4-train.00000-of-01024.first1000"),
    "wikipedia": ("wikipedia-en-sample", None, "train"),
}

WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
# The mirrored C4 shard is split for an honest evaluation protocol: `c4` calibration reads only its first
# 900 documents, and the last 100 (joined by blank lines) are the `c4-eval` perplexity text.
C4_CALIBRATION_DOCUMENTS = 900
C4_EVAL = "c4-eval"
EVALUATION_DATASETS = ("wikitext2", C4_EVAL)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_TOKENIZE_BATCH = 64
# Tokenise only until the stream holds this many times the tokens the windows need: enough variety for
# random windows without tokenising an 11M-token corpus for a handful of samples.
_STREAM_FACTOR = 4


def data_dir() -> Path | None:
    """The local data mirror: `$SEMISPARSE_DATA_DIR`, else `../shared/data` next to the cwd or the repo."""
    configured = os.environ.get("SEMISPARSE_DATA_DIR")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise SemisparseError(
                f"SEMISPARSE_DATA_DIR={configured} is not a directory; "
                "point it at the data mirror or unset it"
            )
        return path.resolve()
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def mirror_file(path: str, config: str | None, split: str) -> Path | None:
    """The local mirror's file for a Hugging Face dataset id, config and split, or None if not mirrored."""
    root = data_dir()
    if root is None:
        return None
    folder = root / path if config is None else root / path / config
    for suffix in _JSONL_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def expected_location(path: str, config: str | None, split: str) -> str:
    """Where the mirror file of a dataset split should be, for "put it here" error messages."""
    root = data_dir()
    relative = "/".join(part for part in (path, config, f"{split}.jsonl") if part)
    return f"{root if root is not None else '$SEMISPARSE_DATA_DIR'}/{relative}"


def _unreadable(path: Path, err: BaseException) -> SemisparseError:
    """One line for a text file that cannot be decoded or decompressed (binary, not UTF-8, broken gzip)."""
    if isinstance(err, UnicodeDecodeError):
        byte = err.object[err.start : err.start + 1]
        return SemisparseError(
            f"{path} is not UTF-8 text (undecodable byte {byte!r}); convert it to UTF-8 or pass a text file"
        )
    if isinstance(err, gzip.BadGzipFile | EOFError | zlib.error):
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "truncated"
        return SemisparseError(f"{path} is not a valid gzip file ({detail}); re-create or re-download it")
    reason = getattr(err, "strerror", None) or type(err).__name__
    return SemisparseError(f"cannot read {path} ({reason}); check the file")


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SemisparseError(
                        f"{path} line {number} is not valid JSON ({err}); fix or replace the file"
                    ) from err
                if not isinstance(row, dict):
                    raise SemisparseError(
                        f"{path} line {number} is not a JSON object; each line must be one row"
                    )
                yield row
    except (UnicodeDecodeError, OSError, EOFError, zlib.error) as err:
        raise _unreadable(path, err) from err


def load_rows(path: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a dataset split from the mirror, else from the Hub via `datasets` (imported only then).

    `split` may also be a file stem of the mirror (e.g. the C4 shard name), which the Hub would not know.
    """
    local = mirror_file(path, config, split)
    if local is not None:
        return list(_iter_jsonl(local))
    expected = expected_location(path, config, split)
    try:
        import datasets
    except ImportError as err:
        raise SemisparseError(
            f"{path} ({config}, {split}) is not in the data mirror (expected {expected}) and the 'datasets' "
            "package is not installed; add the file there or pip install datasets"
        ) from err
    try:
        return [dict(row) for row in datasets.load_dataset(path, config, split=split)]
    except Exception as err:
        raise SemisparseError(
            f"cannot load {path} ({config}, {split}) from the Hub ({type(err).__name__}); "
            f"put the file at {expected} or check the network"
        ) from err


def _iter_texts(file: Path) -> Iterator[str]:
    """Texts of a .txt file (one text) or of the "text" field of each JSONL row, read lazily."""
    name = file.name.lower()
    if name.endswith(".txt"):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise _unreadable(file, err) from err
        yield text
    elif name.endswith(_JSONL_SUFFIXES):
        for number, row in enumerate(_iter_jsonl(file), start=1):
            text = row.get("text")
            if not isinstance(text, str):
                raise SemisparseError(f"{file} row {number} has no 'text' string; every row needs one")
            yield text
    else:
        raise SemisparseError(f"cannot read texts from {file}; use a .txt, .jsonl or .jsonl.gz file")


def read_texts(file: str | Path) -> list[str]:
    """Texts of a .txt file (the whole file) or a .jsonl / .jsonl.gz file (field "text" of each row)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise SemisparseError(f"text file {file} does not exist; check the path")
    return list(_iter_texts(path))


def wikitext2_test_text() -> str:
    """The standard WikiText-2 perplexity text: the raw test rows joined by blank lines."""
    return "\n\n".join(row["text"] for row in load_rows(*WIKITEXT2))


def c4_eval_text() -> tuple[str, dict[str, Any]]:
    """The held-out C4 text: the mirrored shard's documents after the first 900 (which calibration reads),
    joined by blank lines, and its source with the sha256 of that text."""
    file, recorded = _calibration_file("c4")
    texts = list(itertools.islice(_iter_texts(file), C4_CALIBRATION_DOCUMENTS, None))
    if not texts:
        raise SemisparseError(
            f"{file} has no documents after the first {C4_CALIBRATION_DOCUMENTS}: c4-eval needs the full "
            "1000-document shard of the data mirror"
        )
    text = "\n\n".join(texts)
    first = C4_CALIBRATION_DOCUMENTS
    source = {
        "dataset": C4_EVAL,
        "shard": recorded,
        "documents": f"{first}-{first + len(texts) - 1} (0-based)",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, source


def evaluation_text(dataset: str) -> tuple[str, dict[str, Any]]:
    """The text of a perplexity dataset (`wikitext2`, `c4-eval` or a local file) and where it came from."""
    if dataset == "wikitext2":
        return wikitext2_test_text(), {"dataset": "wikitext2", "split": "wikitext-2-raw-v1/test"}
    if dataset == C4_EVAL:
        return c4_eval_text()
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise SemisparseError(
            f"perplexity dataset '{dataset}' is neither 'wikitext2' nor an existing text file; "
            f"use {', '.join(EVALUATION_DATASETS)} or a text file"
        )
    return "\n\n".join(read_texts(path)), {"dataset": str(path), "sha256": file_sha256(path)}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, recorded so a run names exactly the data it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _calibration_file(source: str) -> tuple[Path, str]:
    """The file behind a calibration source, and the name to record for it in provenance."""
    if source in CALIBRATION_SOURCES:
        path, config, stem = CALIBRATION_SOURCES[source]
        local = mirror_file(path, config, stem)
        if local is None:
            raise SemisparseError(
                f"calibration source '{source}' needs {expected_location(path, config, stem)}; "
                "set SEMISPARSE_DATA_DIR to the data mirror or pass a .txt/.jsonl file"
            )
        root = data_dir()
        return local, local.relative_to(root).as_posix() if root is not None else str(local)
    local = Path(source).expanduser()
    if local.is_file():
        return local, str(local.resolve())
    raise SemisparseError(
        f"unknown calibration source '{source}'; use {', '.join(CALIBRATION_SOURCES)} or a .txt/.jsonl file"
    )


def _token_stream(tokenizer: Any, texts: Iterable[str], budget: int) -> tuple[torch.Tensor, int]:
    """Tokenise documents in batches into one stream, EOS between documents, stopping past `budget` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[list[int]] = []
    total = 0
    documents = iter(text for text in texts if text.strip())
    while total < budget:
        batch = list(itertools.islice(documents, _TOKENIZE_BATCH))
        if not batch:
            break
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append([*ids, *eos])
            total += len(ids) + len(eos)
    return torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long), len(pieces)


def window_bos(tokenizer: Any) -> int | None:
    """The BOS id that every perplexity and calibration window must start with: the tokenizer's, when it
    puts one before a text (Gemma's does, and Gemma needs it); None when it adds none (SmolLM2, GPT-2, OPT's
    own BOS handling aside), which leaves those windows exactly as before."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibration_ids(
    tokenizer: Any, source: str = "c4", n_samples: int = 128, seqlen: int = 2048, seed: int = 0
) -> tuple[torch.LongTensor, dict[str, Any]]:
    """Random token windows for calibration, following the SparseGPT/Wanda protocol.

    The papers draw each window from a random C4 document longer than the window; our C4 mirror has few
    such documents, so windows start at random offsets of the concatenated document stream instead.
    Returns ids [n_samples, seqlen] and a provenance dict (source, files with sha256, sizes, seed). With a
    tokenizer that adds a BOS (`window_bos`), each window is BOS + `seqlen` − 1 tokens of the stream.
    """
    if n_samples < 1 or seqlen < 1:
        raise SemisparseError(
            f"calibration needs at least one window of at least one token (got {n_samples} x {seqlen}); "
            "raise the sample count or `seqlen`"
        )
    file, recorded = _calibration_file(source)
    texts = _iter_texts(file)
    if source == "c4":  # the documents after these are the c4-eval text
        texts = itertools.islice(texts, C4_CALIBRATION_DOCUMENTS)
    stream, documents = _token_stream(tokenizer, texts, _STREAM_FACTOR * n_samples * (seqlen + 1))
    if len(stream) < seqlen + 1:
        raise SemisparseError(
            f"calibration set too small: {len(stream)} tokens for windows of {seqlen}; "
            "use more data or a smaller `seqlen`"
        )
    bos = window_bos(tokenizer) if seqlen > 1 else None
    width = seqlen - 1 if bos is not None else seqlen
    rng = random.Random(seed)
    starts = torch.tensor([rng.randint(0, len(stream) - width - 1) for _ in range(n_samples)])
    ids = stream[starts[:, None] + torch.arange(width)]
    if bos is not None:
        ids = torch.cat([ids.new_full((n_samples, 1), bos), ids], dim=1)
    provenance = {
        "source": source,
        "files": {recorded: file_sha256(file)},
        "n_samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "documents": documents,
        "stream_tokens": len(stream),
        "bos": bos is not None,
    }
    return ids, provenance
