from __future__ import annotations

import gzip
import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from semisparse import data
from semisparse.data import (
    calibration_ids,
    data_dir,
    evaluation_text,
    file_sha256,
    load_rows,
    read_texts,
    wikitext2_test_text,
)
from semisparse.errors import SemisparseError

C4_FILE = "allenai/c4/en/c4-train.00000-of-01024.first1000.jsonl"
DOCS = [
    f"document {i}: the capital of France is Paris and two of every four weights stay." for i in range(40)
]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(payload)
    else:
        path.write_text(payload, encoding="utf-8")
    return path


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data mirror that data_dir() points at."""
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(root))
    return root


@pytest.fixture
def c4_mirror(mirror: Path) -> Path:
    write_jsonl(mirror / C4_FILE, [{"text": text, "timestamp": "2019"} for text in DOCS])
    return mirror


def test_data_dir_from_env_var(mirror: Path) -> None:
    assert data_dir() == mirror.resolve()


def test_data_dir_env_var_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(SemisparseError, match="SEMISPARSE_DATA_DIR"):
        data_dir()


def test_data_dir_next_to_cwd_then_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEMISPARSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "elsewhere" / "src" / "semisparse" / "data.py"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data_dir() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_dir() == (tmp_path / "shared" / "data").resolve()


def test_data_dir_next_to_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEMISPARSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "repo" / "src" / "semisparse" / "data.py"))
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert data_dir() == (tmp_path / "shared" / "data").resolve()


def test_load_rows_from_mirror_layouts(mirror: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    write_jsonl(mirror / "org/set/cfg/validation.jsonl", rows)
    write_jsonl(mirror / "plain/train.jsonl.gz", rows[:1])
    assert load_rows("org/set", "cfg", "validation") == rows
    assert load_rows("plain", None, "train") == rows[:1]


def test_load_rows_accepts_a_file_stem_as_split(c4_mirror: Path) -> None:
    rows = load_rows("allenai/c4", "en", "c4-train.00000-of-01024.first1000")
    assert [row["text"] for row in rows] == DOCS


def test_load_rows_without_mirror_or_datasets_names_expected_path(
    mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SemisparseError) as caught:
        load_rows("org/set", "cfg", "test")
    assert str(mirror.resolve() / "org/set/cfg/test.jsonl") in str(caught.value)
    assert "datasets" in str(caught.value)


def test_load_rows_falls_back_to_the_hub(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(path: str, config: str | None, split: str) -> list[dict[str, object]]:
        calls.append((path, config, split))
        if path == "broken/set":
            raise ConnectionError("offline")
        return [{"text": "from the hub"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_rows("org/set", "cfg", "test") == [{"text": "from the hub"}]
    assert calls == [("org/set", "cfg", "test")]
    with pytest.raises(SemisparseError, match=r"ConnectionError.*broken/set/x/test\.jsonl"):
        load_rows("broken/set", "x", "test")


def test_read_texts_for_each_file_type(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    assert read_texts(txt) == ["line one\nline two\n"]
    rows = [{"text": "first", "id": 1}, {"text": "second"}]
    plain = write_jsonl(tmp_path / "rows.jsonl", rows)
    plain.write_text(plain.read_text() + "\n", encoding="utf-8")
    assert read_texts(plain) == ["first", "second"]
    assert read_texts(str(write_jsonl(tmp_path / "rows.jsonl.gz", rows))) == ["first", "second"]


def test_read_texts_errors(tmp_path: Path) -> None:
    with pytest.raises(SemisparseError, match="no 'text'"):
        read_texts(write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}]))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SemisparseError, match=r"\.txt, \.jsonl or \.jsonl\.gz"):
        read_texts(tmp_path / "data.csv")
    with pytest.raises(SemisparseError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SemisparseError, match="line 2 is not valid JSON"):
        read_texts(tmp_path / "broken.jsonl")


def unreadable_files(tmp_path: Path) -> list[tuple[Path, str]]:
    """A binary .txt / .jsonl, a .jsonl.gz that is not gzip, and a truncated one, with their messages."""
    binary = bytes(range(256)) * 4
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "binary.txt").write_bytes(binary)
    (tmp_path / "binary.jsonl").write_bytes(b'{"text": "ok"}\n' + binary)
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"text": "not compressed"}\n')
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", [{"text": text} for text in DOCS]).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    return [
        (tmp_path / "binary.txt", "is not UTF-8 text"),
        (tmp_path / "binary.jsonl", "is not UTF-8 text"),
        (tmp_path / "plain.jsonl.gz", "is not a valid gzip file"),
        (tmp_path / "cut.jsonl.gz", "is not a valid gzip file"),
    ]


def test_binary_or_broken_files_are_one_line_errors(tmp_path: Path, tiny_tokenizer) -> None:
    for path, message in unreadable_files(tmp_path):
        with pytest.raises(SemisparseError, match=message) as info:
            read_texts(path)
        assert "\n" not in str(info.value) and path.name in str(info.value)
        with pytest.raises(SemisparseError, match=message):
            calibration_ids(tiny_tokenizer, str(path), n_samples=2, seqlen=8)


def test_prune_with_a_broken_calibration_file_is_one_line(tmp_path: Path, dense_dir: Path) -> None:
    from click.testing import CliRunner

    from semisparse.cli import main

    for path, message in unreadable_files(tmp_path / "files"):
        args = ["prune", str(dense_dir), "-o", str(tmp_path / "out"), "--calibration", str(path)]
        result = CliRunner().invoke(main, [*args, "--nsamples", "2", "--seqlen", "16", "--quiet"])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
        assert not (tmp_path / "out").exists()


def test_wikitext2_test_text_joins_rows_with_blank_lines(mirror: Path) -> None:
    write_jsonl(
        mirror / "Salesforce/wikitext/wikitext-2-raw-v1/test.jsonl",
        [{"text": ""}, {"text": " = Title = \n"}, {"text": " Body .\n"}],
    )
    assert wikitext2_test_text() == "\n\n = Title = \n\n\n Body .\n"


def test_evaluation_text_from_wikitext2_or_a_file(mirror: Path, tmp_path: Path) -> None:
    write_jsonl(mirror / "Salesforce/wikitext/wikitext-2-raw-v1/test.jsonl", [{"text": " A .\n"}])
    assert evaluation_text("wikitext2") == (
        " A .\n",
        {"dataset": "wikitext2", "split": "wikitext-2-raw-v1/test"},
    )
    path = tmp_path / "eval.txt"
    path.write_text("some text")
    assert evaluation_text(str(path)) == ("some text", {"dataset": str(path), "sha256": file_sha256(path)})
    with pytest.raises(SemisparseError, match="neither 'wikitext2' nor an existing text file"):
        evaluation_text(str(tmp_path / "missing.txt"))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"semisparse" * 100_000)
    assert file_sha256(path) == hashlib.sha256(b"semisparse" * 100_000).hexdigest()


def _stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += [*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return ids


def _contains(stream: list[int], window: list[int]) -> bool:
    return any(stream[i : i + len(window)] == window for i in range(len(stream) - len(window) + 1))


def test_calibration_windows_come_from_the_document_stream(
    c4_mirror: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    ids, provenance = calibration_ids(tiny_tokenizer, "c4", n_samples=6, seqlen=32, seed=0)
    assert ids.shape == (6, 32)
    assert ids.dtype == torch.long
    stream = _stream(tiny_tokenizer, DOCS)
    assert all(_contains(stream, row) for row in ids.tolist())
    assert provenance == {
        "source": "c4",
        "files": {C4_FILE: file_sha256(c4_mirror / C4_FILE)},
        "n_samples": 6,
        "seqlen": 32,
        "seed": 0,
        "documents": len(DOCS),
        "stream_tokens": len(stream),
        "bos": False,
    }


def test_calibration_is_deterministic_per_seed(
    c4_mirror: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    first, _ = calibration_ids(tiny_tokenizer, "c4", n_samples=8, seqlen=16, seed=0)
    again, _ = calibration_ids(tiny_tokenizer, "c4", n_samples=8, seqlen=16, seed=0)
    other, _ = calibration_ids(tiny_tokenizer, "c4", n_samples=8, seqlen=16, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_calibration_too_small(c4_mirror: Path, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(SemisparseError, match=r"calibration set too small: \d+ tokens for windows of 100000"):
        calibration_ids(tiny_tokenizer, "c4", n_samples=1, seqlen=100_000)
    with pytest.raises(SemisparseError, match="at least one window"):
        calibration_ids(tiny_tokenizer, "c4", n_samples=0, seqlen=16)


def test_calibration_exactly_seqlen_plus_one_tokens(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("two of every four")
    n_tokens = len(tiny_tokenizer("two of every four", add_special_tokens=False).input_ids) + 1
    ids, provenance = calibration_ids(tiny_tokenizer, str(text), n_samples=3, seqlen=n_tokens - 1)
    assert ids.shape == (3, n_tokens - 1)
    assert provenance["files"] == {str(text.resolve()): file_sha256(text)}
    with pytest.raises(SemisparseError, match="too small"):
        calibration_ids(tiny_tokenizer, str(text), n_samples=3, seqlen=n_tokens)


def test_calibration_sources_that_are_not_available(
    mirror: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    with pytest.raises(SemisparseError, match="unknown calibration source 'wikitext2'"):
        calibration_ids(tiny_tokenizer, "wikitext2")
    with pytest.raises(SemisparseError, match=r"c4-train\.00000-of-01024\.first1000\.jsonl"):
        calibration_ids(tiny_tokenizer, "c4")


def test_wikipedia_calibration_tokenizes_only_what_it_needs(
    mirror: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    articles = [
        {"id": i, "title": f"T{i}", "text": f"Article {i} says the capital of France is Paris."}
        for i in range(500)
    ]
    write_jsonl(mirror / "wikipedia-en-sample/train.jsonl.gz", articles)
    ids, provenance = calibration_ids(tiny_tokenizer, "wikipedia", n_samples=2, seqlen=8, seed=3)
    assert ids.shape == (2, 8)
    assert provenance["files"] == {
        "wikipedia-en-sample/train.jsonl.gz": file_sha256(mirror / "wikipedia-en-sample/train.jsonl.gz")
    }
    assert 0 < provenance["documents"] < 500
    assert provenance["stream_tokens"] >= 4 * 2 * 9


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "shared" / "data" / C4_FILE).is_file(), reason="no data mirror"
)
def test_real_c4_mirror_matches_pinned_checksum(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(root))
    pinned = dict(
        (name.removeprefix("./"), digest)
        for digest, name in (line.split() for line in (root / "SHA256SUMS").read_text().splitlines())
    )
    ids, provenance = calibration_ids(tiny_tokenizer, "c4", n_samples=4, seqlen=128)
    assert ids.shape == (4, 128)
    assert provenance["files"] == {C4_FILE: pinned[C4_FILE]}
    assert wikitext2_test_text().startswith("\n\n = Robert Boulter = \n")
