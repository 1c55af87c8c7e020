"""The training corpus as packed token sequences, tokenised once and cached.

Documents are tokenised in order and joined with EOS into one token stream, saved as a `.npy` file in the
semisparse cache keyed by the corpus sha256 and the tokenizer, so a second run (or another rank) maps it
from disk instead of tokenising again. The stream is cut into non-overlapping sequences of `seq_len`
tokens; their order is a seeded permutation per epoch, so the sequence at global index `g` is a pure
function of (corpus, seq_len, seed, g). The data position of a run is therefore just `g`, which makes
resuming exact and lets every rank take its own slice of a global batch without coordination.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from semisparse.data import _iter_jsonl, _iter_texts, data_dir, file_sha256, load_rows
from semisparse.errors import SemisparseError
from semisparse.export import usual_mode
from semisparse.models import cache_dir

SHORTCUTS: dict[str, tuple[str, str]] = {"wikipedia": ("wikipedia-en-sample", "train.jsonl.gz")}
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
_HUB_SPEC = re.compile(r"^(?:hf:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?::([\w.-]+))?(?::([\w.\[\]%:-]+))?$")
_TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class CorpusSource:
    """Where the training text comes from: a local file, or a Hub dataset `(path, config, split)`."""

    spec: str
    file: Path | None = None
    hub: tuple[str, str | None, str] | None = None

    @property
    def recorded(self) -> str:
        """The name provenance records: the path relative to the data mirror when it lives there."""
        if self.file is None:
            path, config, split = self.hub
            return f"hf:{path}" + (f":{config}" if config else "") + f":{split}"
        root = data_dir()
        if root is not None and self.file.is_relative_to(root):
            return self.file.relative_to(root).as_posix()
        return str(self.file)


def _is_text_file(name: str) -> bool:
    return name.lower().endswith(TEXT_SUFFIXES)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or _is_text_file(spec)


def check_corpus_spec(spec: str) -> None:
    """Reject a corpus that can never work, without reading it (config validation)."""
    resolve_corpus(spec, check_mirror=False)


def resolve_corpus(spec: str, check_mirror: bool = True) -> CorpusSource:
    """`wikipedia` (the mirror's sample), a local .txt/.jsonl/.jsonl.gz, or `org/name[:config[:split]]`."""
    if not isinstance(spec, str) or not spec:
        raise SemisparseError("no corpus given; set `corpus` to wikipedia, a .txt/.jsonl file or a dataset")
    if spec in SHORTCUTS:
        folder, name = SHORTCUTS[spec]
        root = data_dir()
        file = root / folder / name if root is not None else None
        if check_mirror and (file is None or not file.is_file()):
            where = file or f"$SEMISPARSE_DATA_DIR/{folder}/{name}"
            raise SemisparseError(
                f"corpus '{spec}' needs {where}; set SEMISPARSE_DATA_DIR to the data mirror or pass a file"
            )
        return CorpusSource(spec, file=file)
    local = Path(spec).expanduser()
    if local.is_file():
        if not _is_text_file(local.name):
            raise SemisparseError(f"corpus {spec} is not a .txt, .jsonl or .jsonl.gz file; convert it")
        return CorpusSource(spec, file=local.resolve())
    if local.exists():
        raise SemisparseError(f"corpus {spec} is not a file; pass a .txt, .jsonl or .jsonl.gz file")
    if _looks_like_path(spec):
        raise SemisparseError(f"corpus file {spec} does not exist; check the path")
    match = _HUB_SPEC.match(spec)
    if match:
        path, config, split = match.groups()
        return CorpusSource(spec, hub=(path, config, split or "train"))
    raise SemisparseError(
        f"unknown corpus '{spec}'; use {', '.join(SHORTCUTS)}, a .txt/.jsonl/.jsonl.gz file, "
        "or a hub dataset id org/name[:config[:split]]"
    )


def check_eval_corpus(spec: str) -> None:
    if spec != "wikitext2" and not Path(spec).expanduser().is_file():
        raise SemisparseError(f"eval corpus '{spec}' is neither 'wikitext2' nor an existing text file")


def tokenizer_key(tokenizer: Any) -> str:
    """A short hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        identity = backend.to_str()
    else:
        identity = f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    identity += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _hub_texts(source: CorpusSource) -> tuple[list[str], str]:
    rows = load_rows(*source.hub)
    texts = []
    digest = hashlib.sha256()
    for number, row in enumerate(rows, start=1):
        text = row.get("text")
        if not isinstance(text, str):
            raise SemisparseError(f"{source.spec} row {number} has no 'text' string; use a dataset with one")
        texts.append(text)
        digest.update(text.encode())
        digest.update(b"\0")
    return texts, digest.hexdigest()


def _count_documents(file: Path) -> int | None:
    if file.name.lower().endswith(".txt"):
        return 1
    return sum(1 for _ in _iter_jsonl(file))


def _tokenise(
    tokenizer: Any, texts: Iterator[str], total: int | None, progress: bool
) -> tuple[np.ndarray, int]:
    """All documents in order, each followed by EOS, as one flat array of the smallest fitting dtype."""
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chunks: list[np.ndarray] = []
    documents = 0
    batch: list[str] = []
    with tqdm(total=total, desc="tokenising corpus", unit="doc", disable=not progress) as bar:

        def flush() -> None:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            flat = [token for row in ids for token in (*row, *eos)]
            chunks.append(np.asarray(flat, dtype=dtype))
            bar.update(len(batch))
            batch.clear()

        for text in texts:
            if not text.strip():
                continue
            batch.append(text)
            documents += 1
            if len(batch) == _TOKENIZE_BATCH:
                flush()
        if batch:
            flush()
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return stream, documents


def load_token_stream(
    source: CorpusSource, tokenizer: Any, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """The corpus as one token stream (memory-mapped from the cache) and its provenance."""
    if source.file is not None:
        sha = file_sha256(source.file)
        texts: Iterator[str] | None = None
    else:
        hub_texts, sha = _hub_texts(source)
        texts = iter(hub_texts)
    folder = cache_dir() / "corpora"
    key = f"{sha[:16]}-{tokenizer_key(tokenizer)}"
    stream_file, info_file = folder / f"{key}.npy", folder / f"{key}.json"
    if not (stream_file.is_file() and info_file.is_file()):
        total = _count_documents(source.file) if source.file is not None else None
        if texts is None:
            texts = _iter_texts(source.file)
        stream, documents = _tokenise(tokenizer, texts, total, progress)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"documents": documents, "tokens": int(stream.size)}
        _atomic_write(stream_file, lambda handle: np.save(handle, stream))
        _atomic_write(info_file, lambda handle: handle.write(json.dumps(info).encode()))
    stream, info = _read_cache(stream_file, info_file)
    provenance = {
        "corpus": source.recorded,
        "sha256": sha,
        "tokenizer_key": tokenizer_key(tokenizer),
        "documents": info["documents"],
        "tokens": int(stream.size),
        "cache": str(stream_file),
    }
    return stream, provenance


def _read_cache(stream_file: Path, info_file: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The cached token stream, memory-mapped, and its info; a truncated or altered cache is an error."""
    try:
        info = json.loads(info_file.read_text())
        stream = np.load(stream_file, mmap_mode="r")
        expected = int(info["tokens"])
        int(info["documents"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        detail = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        problem = f"cannot be read ({detail})"
    else:
        if stream.ndim == 1 and stream.size == expected:
            return stream, info
        problem = f"holds {stream.size} tokens instead of {expected}"
    raise SemisparseError(
        f"the corpus cache {stream_file} {problem}; delete it and {info_file.name} to tokenise again"
    )


def _atomic_write(target: Path, write: Any) -> None:
    """Write through a temporary sibling and rename: concurrent ranks or a crash never leave half a file."""
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.chmod(name, usual_mode(directory=False))  # mkstemp makes it private
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


class PackedSequences:
    """Sequence `g` of the endless, epoch-wise shuffled sequence order of a token stream."""

    def __init__(self, stream: np.ndarray, seq_len: int, seed: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.seed = seed
        self.per_epoch = len(stream) // seq_len
        if self.per_epoch < 1:
            raise SemisparseError(
                f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}; "
                "use a larger corpus or a smaller `seq_len`"
            )
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.per_epoch)
            self._epoch = epoch
        return self._order

    def chunk_index(self, g: int) -> int:
        """Which `seq_len` chunk of the stream global sequence `g` is."""
        epoch, position = divmod(g, self.per_epoch)
        return int(self._permutation(epoch)[position])

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Global sequences start .. start+count-1 as a LongTensor [count, seq_len]."""
        rows = [self.chunk_index(g) * self.seq_len for g in range(start, start + count)]
        windows = np.stack([np.asarray(self.stream[r : r + self.seq_len], dtype=np.int64) for r in rows])
        return torch.from_numpy(windows)

    def epochs(self, sequences: int) -> float:
        return sequences / self.per_epoch
