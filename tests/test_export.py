import json
import os
import stat

import pytest

from semisparse.errors import SemisparseError
from semisparse.export import atomic_directory, ensure_output_available, provenance, read_metadata


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SemisparseError, match="choose another `out` or pass `overwrite`"):
        ensure_output_available(out, overwrite=False)
    with pytest.raises(SemisparseError, match="choose another `report_dir` or pass `overwrite`"):
        ensure_output_available(out, overwrite=False, name="report_dir")
    assert ensure_output_available(out, overwrite=True) == out


def test_atomic_directory_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, overwrite=False) as tmp:
        (tmp / "weights").write_text("w")
        assert not out.exists()
    assert (out / "weights").read_text() == "w"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=False) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_metadata_round_trip_and_corrupt_file(tmp_path):
    meta = provenance(method="wanda", pattern="2:4")
    assert {"versions", "command", "created"} <= meta.keys()
    assert meta["versions"]["torch"]
    (tmp_path / "semisparse.json").write_text(json.dumps(meta))
    assert read_metadata(tmp_path)["method"] == "wanda"
    assert read_metadata(tmp_path / "missing") is None
    (tmp_path / "semisparse.json").write_text("{not json")
    with pytest.raises(SemisparseError, match="not valid JSON"):
        read_metadata(tmp_path)


def test_output_directory_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", overwrite=False):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
