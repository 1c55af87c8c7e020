"""Perplexity follows the SparseGPT/Wanda protocol: non-overlapping windows, exp of the mean window loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, VOCAB_SIZE, make_tiny_model
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from semisparse.errors import SemisparseError
from semisparse.evaluation.perplexity import perplexity, tokenize_text


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    return make_tiny_model("llama")


def stream(n_tokens: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, VOCAB_SIZE, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def hand_perplexity(model: PreTrainedModel, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """exp of the mean over windows of the mean next-token CE, one window at a time, with plain torch."""
    losses = []
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logits = model(window.unsqueeze(0)).logits[0]
            log_probs = F.log_softmax(logits[:-1].double(), dim=-1)
            losses.append(-log_probs.gather(1, window[1:, None]).mean())
    return math.exp(torch.stack(losses).mean().item())


def test_matches_hand_computation_and_drops_remainder(llama: PreTrainedModel) -> None:
    ids = stream(5 * 32 + 17)
    result = perplexity(llama, ids, seqlen=32, progress=False)
    assert (result.n_windows, result.total_windows, result.seqlen, result.n_tokens) == (5, 5, 32, 160)
    assert result.perplexity == pytest.approx(hand_perplexity(llama, ids, 32, 5), rel=1e-5)
    assert result.mean_nll == pytest.approx(math.log(result.perplexity), rel=1e-9)


def test_window_boundaries_matter(llama: PreTrainedModel) -> None:
    ids = stream(4 * 32)
    shifted = perplexity(llama, ids[16:], seqlen=32, progress=False)
    assert shifted.n_windows == 3
    assert shifted.perplexity == pytest.approx(hand_perplexity(llama, ids[16:], 32, 3), rel=1e-5)


def test_batch_size_does_not_change_result(llama: PreTrainedModel) -> None:
    ids = stream(7 * 24)
    one = perplexity(llama, ids, seqlen=24, batch_size=1, progress=False)
    three = perplexity(llama, ids, seqlen=24, batch_size=3, progress=False)
    assert three.n_windows == 7
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_max_windows_limits_count(llama: PreTrainedModel) -> None:
    ids = stream(6 * 16)
    result = perplexity(llama, ids, seqlen=16, max_windows=2, progress=False)
    assert (result.n_windows, result.total_windows, result.n_tokens) == (2, 6, 32)
    assert result.perplexity == pytest.approx(hand_perplexity(llama, ids, 16, 2), rel=1e-5)
    assert perplexity(llama, ids, seqlen=16, max_windows=50, progress=False).n_windows == 6


def test_default_seqlen_is_context_capped_at_2048(llama: PreTrainedModel) -> None:
    result = perplexity(llama, stream(2 * CONTEXT + 5), progress=False)
    assert (result.seqlen, result.total_windows) == (CONTEXT, 2)


def test_seqlen_beyond_context_names_both_numbers(llama: PreTrainedModel) -> None:
    with pytest.raises(SemisparseError, match=rf"`seqlen`={CONTEXT + 1} .*`seqlen`={CONTEXT} or less"):
        perplexity(llama, stream(4 * CONTEXT), seqlen=CONTEXT + 1, progress=False)


def test_stream_shorter_than_one_window_errors(llama: PreTrainedModel) -> None:
    with pytest.raises(SemisparseError, match="31 tokens"):
        perplexity(llama, stream(31), seqlen=32, progress=False)


@pytest.mark.parametrize(
    "kwargs", [{"seqlen": 1}, {"seqlen": 16, "batch_size": 0}, {"seqlen": 16, "max_windows": 0}]
)
def test_invalid_settings_error(llama: PreTrainedModel, kwargs: dict[str, int]) -> None:
    name = list(kwargs)[-1]  # the message names the Python parameter (the CLI shows its flag)
    with pytest.raises(SemisparseError, match=f"`{name}`={kwargs[name]} "):
        perplexity(llama, stream(64), progress=False, **kwargs)


def test_rejects_batched_ids_but_accepts_tokenizer_row(llama: PreTrainedModel) -> None:
    ids = stream(64)
    with pytest.raises(SemisparseError, match="1-D"):
        perplexity(llama, ids.view(2, 32), seqlen=16, progress=False)
    row = perplexity(llama, ids.unsqueeze(0), seqlen=16, progress=False)
    assert row.perplexity == perplexity(llama, ids, seqlen=16, progress=False).perplexity


def test_uniform_logits_give_vocab_size() -> None:
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.norm.weight.zero_()
    result = perplexity(model, stream(3 * 20), seqlen=20, progress=False)
    assert result.perplexity == pytest.approx(VOCAB_SIZE, rel=1e-4)


def test_dropout_is_off_during_evaluation_and_mode_restored() -> None:
    model = make_tiny_model("gpt2")
    ids = stream(4 * 32)
    evaluated = perplexity(model, ids, seqlen=32, progress=False).perplexity
    model.train()
    assert perplexity(model, ids, seqlen=32, progress=False).perplexity == pytest.approx(evaluated, rel=1e-6)
    assert model.training


def test_tokenize_text_gives_one_stream(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    text = "The capital of France is Paris.\n\nA quick brown fox."
    ids = tokenize_text(tiny_tokenizer, text)
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert ids.tolist() == tiny_tokenizer(text).input_ids
