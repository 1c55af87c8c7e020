"""`OUT/semisparse.json` of a recipe run: the provenance chain of its stages, and the files beside it.

The chain holds per stage its name, config, input, output (paths inside OUT are relative to it, so the
chain stays valid when OUT moves), status (running, failed, finished), seconds, the data files its metadata
names with their sha256, the library versions, and what the chain decided for it (`chained`); then the
final model. It is rewritten atomically whenever a stage record changes, so an interrupted run always
leaves a readable chain that `Recipe.run(resume=True)` continues from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from semisparse.errors import SemisparseError
from semisparse.export import METADATA_FILE, provenance, read_metadata

CHAIN_FORMAT = 1
RECIPE_FILE = "recipe.yaml"
# Keys that name a data file next to its "sha256" in a stage's metadata (see `data_files`).
NAME_KEYS = ("file", "path", "dataset", "corpus")


def plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so YAML, JSON and comparisons agree."""
    return json.loads(json.dumps(value, default=str))


def data_files(metadata: Any) -> dict[str, str]:
    """Every data file a stage's metadata names with its sha256: `{"files": {path: sha}}` entries and
    `{"file"|"path"|"dataset"|"corpus": name, "sha256": sha}` records, found at any depth."""
    found: dict[str, str] = {}

    def visit(value: Any) -> None:
        if isinstance(value, Mapping):
            files = value.get("files")
            if isinstance(files, Mapping):
                found.update({str(k): v for k, v in files.items() if isinstance(v, str)})
            digest = value.get("sha256")
            if isinstance(digest, str):
                names = [value[k] for k in NAME_KEYS if isinstance(value.get(k), str)]
                name = names[0] if names else None
                if name is not None:
                    found[name] = digest
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)

    visit(metadata)
    return found


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def relative(root: Path, path: str) -> str:
    """A path inside `root` as relative to it (the chain stays valid if OUT moves); others unchanged."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def absolute(root: Path, path: str, base: str) -> str:
    """Inverse of `relative` for a chain's model: the base model as given, anything else inside `root`."""
    return path if path == base else str(root / path)


def write_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and a rename, with the usual file permissions."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_tree(root: Path) -> None:
    """Move `root` aside, then delete it, so an interrupted delete never leaves a half-recipe at `root`."""
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.replace(root, trash / root.name)
    shutil.rmtree(trash, ignore_errors=True)


def existing_chain(root: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The chain of an earlier run to resume (None: start afresh); refuses to clobber other directories."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise SemisparseError(f"output path {root} exists and is not a directory: choose another `out`")
    if not any(root.iterdir()):
        return None
    chain = read_metadata(root)
    if chain is None or "recipe_format" not in chain:
        raise SemisparseError(
            f"{root} exists and is not the output of a recipe: choose another `out` (not overwriting it)"
        )
    if overwrite:
        return None
    if not resume:
        raise SemisparseError(
            f"output directory {root} already exists: pass `resume` to continue it, `overwrite` to start "
            "over, or choose another `out`"
        )
    return chain


class Chain:
    """`OUT/semisparse.json`: the provenance chain, rewritten atomically whenever a stage record changes."""

    def __init__(self, root: Path, base: str, records: list[dict[str, Any]], old: dict[str, Any] | None):
        self.root = root
        header = provenance(recipe_format=CHAIN_FORMAT, base_model=base, recipe=RECIPE_FILE)
        if old is not None:
            header["created"] = old.get("created", header["created"])
        self.chain = {**header, "stages": [dict(record) for record in records], "final_model": None}
        self.write()

    def set(self, record: dict[str, Any]) -> None:
        records = self.chain["stages"]
        if records and records[-1]["index"] == record["index"]:
            records[-1] = dict(record)
        else:
            records.append(dict(record))
        self.write()

    def final(self, model: str) -> None:
        self.chain["final_model"] = relative(self.root, model)
        self.write()

    def write(self) -> None:
        self.chain["updated"] = now()
        write_atomic(self.root / METADATA_FILE, json.dumps(self.chain, indent=2, default=str) + "\n")
