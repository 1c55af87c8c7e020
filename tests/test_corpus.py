"""The packed training corpus: sources, the cached token stream, and the seeded sequence order."""

import json

import numpy as np
import pytest
from train_helpers import isolated_cache  # noqa: F401  (autouse fixture)

from semisparse.data import data_dir, file_sha256
from semisparse.errors import SemisparseError
from semisparse.training import corpus as corpus_module
from semisparse.training.corpus import PackedSequences, load_token_stream, resolve_corpus

DOCS = ["The capital of France is Paris.", "", "Sparse networks keep two of four.", "A quick brown fox."]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCS))
    return path


def test_wikipedia_shortcut_points_into_the_mirror():
    if data_dir() is None:
        pytest.skip("no data mirror")
    source = resolve_corpus("wikipedia")
    assert source.file == data_dir() / "wikipedia-en-sample" / "train.jsonl.gz"
    assert source.recorded == "wikipedia-en-sample/train.jsonl.gz"


def test_hub_ids_and_unknown_names(tmp_path):
    assert resolve_corpus("org/name").hub == ("org/name", None, "train")
    assert resolve_corpus("org/name:cfg:validation").hub == ("org/name", "cfg", "validation")
    with pytest.raises(SemisparseError, match="unknown corpus"):
        resolve_corpus("wikipeda")
    with pytest.raises(SemisparseError, match="does not exist"):
        resolve_corpus(str(tmp_path / "missing.jsonl"))


def test_stream_is_documents_joined_with_eos(jsonl, tiny_tokenizer):
    stream, info = load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
    expected = []
    for text in DOCS:
        if text:
            expected += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tiny_tokenizer.eos_token_id
            ]
    assert stream.tolist() == expected
    assert info["documents"] == 3
    assert info["tokens"] == len(expected)
    assert info["sha256"] == file_sha256(jsonl)


def test_stream_is_cached_by_file_and_tokenizer(jsonl, tiny_tokenizer, isolated_cache, monkeypatch):  # noqa: F811
    first, info = load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
    cached = list((isolated_cache / "corpora").glob("*.npy"))
    assert len(cached) == 1
    assert cached[0].name.startswith(info["sha256"][:16])

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(corpus_module, "_tokenise", fail)
    second, _ = load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
    assert np.array_equal(first, second)

    jsonl.write_text(json.dumps({"text": "other words"}) + "\n")
    with pytest.raises(AssertionError, match="tokenised again"):
        load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)


def test_each_epoch_is_a_seeded_permutation_of_all_sequences():
    stream = np.arange(10 * 4 + 3)  # 10 sequences of 4 tokens, a remainder of 3 dropped
    packed = PackedSequences(stream, seq_len=4, seed=1)
    epoch0 = [packed.chunk_index(g) for g in range(10)]
    epoch1 = [packed.chunk_index(g) for g in range(10, 20)]
    assert sorted(epoch0) == list(range(10)) == sorted(epoch1)
    assert epoch0 != epoch1
    assert epoch0 == [PackedSequences(stream, 4, seed=1).chunk_index(g) for g in range(10)]
    assert epoch0 != [PackedSequences(stream, 4, seed=2).chunk_index(g) for g in range(10)]
    assert packed.epochs(25) == 2.5


def test_batch_rows_are_the_chunks_in_order():
    stream = np.arange(40, dtype=np.uint16)
    packed = PackedSequences(stream, seq_len=5, seed=0)
    batch = packed.batch(6, 4)
    assert batch.dtype.is_floating_point is False and tuple(batch.shape) == (4, 5)
    for row, g in zip(batch.tolist(), range(6, 10), strict=True):
        start = packed.chunk_index(g) * 5
        assert row == list(range(start, start + 5))
    assert packed.batch(0, 8).tolist() == [*packed.batch(0, 3).tolist(), *packed.batch(3, 5).tolist()]


def test_corpus_shorter_than_one_sequence_rejected():
    with pytest.raises(SemisparseError, match="fewer than one sequence"):
        PackedSequences(np.arange(7), seq_len=8, seed=0)


def test_hub_dataset_rows_are_tokenised_like_files(jsonl, tiny_tokenizer, monkeypatch):
    requested = []

    def fake_rows(path, config, split):
        requested.append((path, config, split))
        return [{"text": text} for text in DOCS]

    monkeypatch.setattr(corpus_module, "load_rows", fake_rows)
    from_hub, info = load_token_stream(resolve_corpus("org/name:cfg"), tiny_tokenizer, progress=False)
    from_file, _ = load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
    assert requested == [("org/name", "cfg", "train")]
    assert np.array_equal(from_hub, from_file)
    assert info["corpus"] == "hf:org/name:cfg:train" and len(info["sha256"]) == 64


def test_damaged_cache_is_a_one_line_error(jsonl, tiny_tokenizer, isolated_cache):  # noqa: F811
    load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
    cached = next((isolated_cache / "corpora").glob("*.npy"))
    data = cached.read_bytes()
    for cut in (len(data) - 3, 20):
        cached.write_bytes(data[:cut])
        with pytest.raises(SemisparseError, match=r"the corpus cache .*\.npy .*delete it") as info:
            load_token_stream(resolve_corpus(str(jsonl)), tiny_tokenizer, progress=False)
        assert "\n" not in str(info.value)


def test_unreadable_corpus_files_are_one_line_errors(tmp_path, tiny_tokenizer):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps({"text": "not compressed"}) + "\n")
    for name, message in (
        ("binary.txt", "is not UTF-8 text"),
        ("plain.jsonl.gz", "is not a valid gzip file"),
    ):
        with pytest.raises(SemisparseError, match=message) as info:
            load_token_stream(resolve_corpus(str(tmp_path / name)), tiny_tokenizer, progress=False)
        assert "\n" not in str(info.value)
