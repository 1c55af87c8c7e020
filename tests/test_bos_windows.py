"""Every perplexity and calibration window starts with BOS when the model's tokenizer adds one (Gemma needs
it), and stays exactly as before when it adds none (SmolLM2, GPT-2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB_SIZE, make_tiny_model

from semisparse.data import calibration_ids, window_bos
from semisparse.evaluation.perplexity import _window_losses, perplexity

C4_FILE = "allenai/c4/en/c4-train.00000-of-01024.first1000.jsonl"
BOS, EOS = 1, 2


class WordTokenizer:
    """Each word is one id (3 + its length); `adds_bos` puts BOS in front of every text, like Gemma's."""

    bos_token_id, eos_token_id = BOS, EOS

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def _encode(self, text: str, special: bool) -> list[int]:
        ids = [3 + len(word) % 20 for word in text.split()]
        return [BOS, *ids] if special and self.adds_bos else ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [self._encode(item, add_special_tokens) for item in text]}
        return {"input_ids": self._encode(text, add_special_tokens)}


@pytest.fixture
def c4_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    file = tmp_path / "data" / C4_FILE
    file.parent.mkdir(parents=True)
    words = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    docs = [" ".join(words[(i + j) % 6] for j in range(40)) for i in range(30)]
    file.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    monkeypatch.setenv("SEMISPARSE_DATA_DIR", str(tmp_path / "data"))
    return file


def test_window_bos_is_the_id_the_tokenizer_puts_first() -> None:
    assert window_bos(WordTokenizer(adds_bos=True)) == BOS
    assert window_bos(WordTokenizer(adds_bos=False)) is None


def test_calibration_windows_start_with_bos_only_when_the_tokenizer_adds_one(c4_mirror: Path) -> None:
    with_bos, info = calibration_ids(WordTokenizer(True), "c4", n_samples=5, seqlen=12, seed=0)
    plain, plain_info = calibration_ids(WordTokenizer(False), "c4", n_samples=5, seqlen=12, seed=0)
    assert with_bos.shape == plain.shape == (5, 12)
    assert (with_bos[:, 0] == BOS).all() and (with_bos[:, 1:] != BOS).all()
    assert (plain != BOS).all()
    assert info["bos"] is True and plain_info["bos"] is False


def manual_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(_window_losses(model.eval(), windows).mean().item())


def test_perplexity_windows_are_bos_plus_seqlen_minus_one_text_tokens() -> None:
    model = make_tiny_model("llama")
    text = torch.randint(3, VOCAB_SIZE, (50,), generator=torch.Generator().manual_seed(0))
    stream = torch.cat([torch.tensor([BOS]), text])  # as a BOS-adding tokenizer returns it
    result = perplexity(model, stream, seqlen=8, progress=False, bos_token_id=BOS)
    assert (result.n_windows, result.total_windows, result.bos) == (7, 7, True)  # 50 // 7 windows
    windows = torch.cat([torch.full((7, 1), BOS), text[:49].view(7, 7)], dim=1)
    assert result.perplexity == pytest.approx(manual_perplexity(model, windows), rel=1e-6)


def test_without_bos_the_windows_are_unchanged() -> None:
    model = make_tiny_model("llama")
    text = torch.randint(3, VOCAB_SIZE, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, text, seqlen=8, progress=False)
    assert (result.n_windows, result.bos) == (6, False)
    assert result.perplexity == pytest.approx(manual_perplexity(model, text[:48].view(6, 8)), rel=1e-6)


def test_training_evaluation_windows_start_with_bos_too(tmp_path: Path) -> None:
    """The evaluation rows of `semisparse train` measure what `semisparse eval` measures."""
    from train_helpers import tiny_config, write_corpus

    from semisparse.training.inputs import evaluate

    model = make_tiny_model("llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config = tiny_config("m", tmp_path / "out", corpus, eval_windows=3, eval_seqlen=8)
    text = torch.randint(3, VOCAB_SIZE, (30,), generator=torch.Generator().manual_seed(1))
    row = evaluate(model, torch.cat([torch.tensor([BOS]), text]), config, 5, 640, bos_token_id=BOS)
    windows = torch.cat([torch.full((3, 1), BOS), text[:21].view(3, 7)], dim=1)
    assert (row["eval_windows"], row["step"], row["tokens"]) == (3, 5, 640)
    assert row["eval_ppl"] == pytest.approx(manual_perplexity(model, windows), rel=1e-6)
