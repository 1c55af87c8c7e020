"""Writing model directories that plain `transformers` loads, with semisparse's provenance beside them.

Outputs are written to a hidden temporary sibling directory and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written output behind.

One writer per output: a job that writes `out` holds an exclusive lock (`flock` on the hidden `.NAME.lock`
beside it, removed afterwards; the kernel drops it if the process dies) from before its work starts until
the rename, so a second run aimed at the same output fails at once with one line instead of one of them
being lost silently. The final rename re-checks the target under the lock and refuses to replace a
directory that appeared meanwhile unless overwriting was asked for. Outputs get the usual permissions
(0777/0666 less the umask), not the private ones of `tempfile`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from semisparse.errors import SemisparseError
from semisparse.runtime import load_average

try:
    import fcntl
except ImportError:  # not POSIX: no writer lock, the final re-check still refuses to replace
    fcntl = None  # type: ignore[assignment]

METADATA_FILE = "semisparse.json"
LOCK_SUFFIX = ".lock"

F = TypeVar("F", bound=Callable[..., Any])


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (changing it races other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def usual_mode(directory: bool) -> int:
    """The mode a plain `open`/`mkdir` would give: 0o666 (files) or 0o777 (directories) less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def usual_permissions(root: Path) -> None:
    """Give `root` and everything in it the usual modes (see `usual_mode`; execute bits are kept).

    `tempfile.mkdtemp` and safetensors (model.safetensors, compressed.safetensors) create private 0700/0600
    entries; an output should be as readable as anything else the user writes.
    """
    directory_mode, file_mode = usual_mode(directory=True), usual_mode(directory=False)
    root.chmod(directory_mode)
    for parent, directories, files in os.walk(root):
        for entry in directories:
            path = os.path.join(parent, entry)
            if not os.path.islink(path):
                os.chmod(path, directory_mode)
        for entry in files:
            path = os.path.join(parent, entry)
            if not os.path.islink(path):
                os.chmod(path, file_mode | (os.stat(path).st_mode & 0o111 & directory_mode))


def check_writable(out: str | Path, name: str = "out") -> Path:
    """Fail before any work is done if `out` could not be created: a parent is a file, or the nearest
    existing parent directory is not writable (a read-only directory or file system)."""
    path = Path(out).expanduser().absolute()
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SemisparseError(
            f"cannot write {path}: {parent} is a file, not a directory; choose another `{name}`"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SemisparseError(
            f"cannot write {path}: directory {parent} is not writable; choose another `{name}`"
        )
    return path


def ensure_output_available(out: str | Path, overwrite: bool, name: str = "out") -> Path:
    """Fail before any work is done if `out` exists and the user did not ask to overwrite it, or if it
    cannot be written at all.

    `name` is the caller's parameter that holds `out`, named in the message (the CLI shows its flag).
    """
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise SemisparseError(
            f"output directory {path} already exists: choose another `{name}` or pass `overwrite`"
        )
    if path.exists() and not path.is_dir():
        raise SemisparseError(f"output path {path} exists and is not a directory: choose another `{name}`")
    check_writable(path, name)
    return path


@dataclass
class _HeldLock:
    owner: int  # the thread holding it: another thread of this process is refused like another process
    depth: int = 1
    created: list[Path] = field(default_factory=list)


_held: dict[Path, _HeldLock] = {}
_held_guard = threading.Lock()


def lock_path(out: str | Path) -> Path:
    """The lock file of an output: `.NAME.lock` beside it."""
    final = Path(out).expanduser().absolute()
    return final.parent / f".{final.name}{LOCK_SUFFIX}"


def _busy(final: Path, name: str, lock: Path) -> SemisparseError:
    try:
        holder = lock.read_text().strip()
    except OSError:
        holder = ""
    who = f" (pid {holder})" if holder.isdigit() else ""
    return SemisparseError(
        f"{final} is being written by another semisparse run{who}: wait for it to finish, "
        f"or choose another `{name}`"
    )


def _make_parents(directory: Path, final: Path, name: str) -> list[Path]:
    """Create `directory` and its missing parents; returns those created (deepest last)."""
    missing = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    created = []
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o777)
            created.append(path)
    except FileExistsError:
        pass  # made meanwhile by someone else: theirs, not ours to remove
    except OSError as err:
        _remove_empty(created)
        raise SemisparseError(
            f"cannot write {final} ({err.strerror or err}): choose another `{name}`"
        ) from err
    return created


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            break


def _acquire(lock: Path, final: Path, name: str) -> int:
    """Open and `flock` the lock file; the descriptor once it is ours and still the file at `lock`."""
    assert fcntl is not None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise SemisparseError(
                f"cannot write {final} ({err.strerror or err}): choose another `{name}`"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(final, name, lock) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)  # the previous holder removed it between our open and our lock: take the new one


@contextmanager
def output_lock(out: str | Path, name: str = "out") -> Iterator[Path]:
    """Hold the exclusive writer lock of `out` for the block; yields `out` as an absolute path.

    Re-entrant within one thread (a job holds it from its start, its `atomic_directory` again at the end);
    another thread or process gets a one-line error naming `name` at once rather than waiting. Missing
    parent directories are created, and removed again if the block fails while they are still empty.
    """
    final = Path(out).expanduser().absolute()
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(final)
        if held is not None and held.owner == me:
            held.depth += 1
    if held is not None and held.owner == me:
        try:
            yield final
        finally:
            with _held_guard:
                held.depth -= 1
        return
    lock = lock_path(final)
    if held is not None:
        raise _busy(final, name, lock)
    created = _make_parents(final.parent, final, name)
    if fcntl is None:
        fd = None
    else:
        try:
            fd = _acquire(lock, final, name)
        except BaseException:
            _remove_empty(created)
            raise
    with _held_guard:
        _held[final] = _HeldLock(me, created=created)
    failed = True
    try:
        yield final
        failed = False
    finally:
        with _held_guard:
            del _held[final]
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still holding it: the next writer takes a fresh file
            os.close(fd)
        if failed:
            _remove_empty(created)


@contextmanager
def reserved_output(
    out: str | Path, overwrite: bool, name: str = "out", refuse_existing: bool = True
) -> Iterator[Path]:
    """Check `out` and hold its writer lock for the block, checking again once the lock is held.

    `refuse_existing`: `out` is an output directory, refused if it exists unless `overwrite` (see
    `ensure_output_available`); False: only that it can be written (the job decides about an existing one:
    a file output, a recipe run that resumes).
    """

    def check() -> None:
        if refuse_existing:
            ensure_output_available(out, overwrite, name)
        else:
            check_writable(out, name)

    check()
    with output_lock(out, name):
        check()
        yield Path(out).expanduser()


def writes_output(
    param: str = "out", overwrite_param: str = "overwrite", refuse_existing: bool = True
) -> Callable[[F], F]:
    """Decorate a job so that its output (argument `param`; None: no output) is checked and locked for the
    whole job, before any model is loaded: see `reserved_output`."""

    def decorate(job: F) -> F:
        signature = inspect.signature(job)

        @functools.wraps(job)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = bound.arguments.get(param)
            if out is None:
                return job(*args, **kwargs)
            overwrite = bool(bound.arguments.get(overwrite_param, False))
            with reserved_output(out, overwrite, param, refuse_existing):
                return job(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _publish(tmp: Path, final: Path, overwrite: bool, name: str) -> None:
    """Rename the finished `tmp` to `final`; an existing `final` is replaced only when `overwrite`: moved
    aside, and deleted once the new one is in place (put back if the rename fails)."""
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise SemisparseError(
                f"output {final} appeared while this run was writing it (another process?), so nothing was "
                f"written: choose another `{name}` or pass `overwrite`"
            )
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(trash / final.name, final)
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError as err:  # appeared in the last instant (not through semisparse, which takes the lock)
        raise SemisparseError(
            f"cannot move the finished output into {final} ({err.strerror or err}), so nothing was written: "
            f"choose another `{name}`"
        ) from err


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool, name: str = "out") -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes without error.

    The writer lock of `out` is held throughout (see `output_lock`); the final rename re-checks `out` and
    refuses to replace one that exists unless `overwrite`, removing the temporary directory.
    """
    ensure_output_available(out, overwrite, name)
    with output_lock(out, name) as final:
        ensure_output_available(final, overwrite, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield tmp
            usual_permissions(tmp)
            _publish(tmp, final, overwrite, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("semisparse", "transformers"):
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def provenance(**fields: Any) -> dict[str, Any]:
    """The common header of every `semisparse.json`: versions, command line and time, plus `fields`."""
    return {
        "semisparse_format": 1,
        **fields,
        "versions": versions(),
        "command": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        # CPU timings in the record depend on these (a shared machine can be several times slower)
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: Any | None,
    out: str | Path,
    metadata: dict[str, Any],
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (safetensors), its tokenizer and `semisparse.json` atomically into `out`.

    `extra`, if given, writes additional files into the temporary directory before it is renamed.
    """
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out).expanduser()


def read_metadata(model_dir: str | Path) -> dict[str, Any] | None:
    """The `semisparse.json` of a model directory, or None for a model semisparse did not write."""
    path = Path(model_dir).expanduser() / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SemisparseError(f"{path} is not valid JSON ({exc.msg}): re-export the model") from exc
