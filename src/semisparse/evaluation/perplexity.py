"""Perplexity with the SparseGPT / Wanda protocol, so numbers compare with the papers' tables.

The token stream is cut into non-overlapping windows of `seqlen` tokens (the remainder is dropped); each
window's loss is the mean next-token cross-entropy inside it, and perplexity is exp of the mean over
windows. No window sees context from the previous one. For a model whose tokenizer adds a BOS token
(Gemma; see `semisparse.data.window_bos`) every window is BOS + `seqlen` − 1 text tokens, as each document
starts in training: Gemma-3-270M's WikiText-2 window 2 measured 30.2 without it and 19.7 with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from semisparse.errors import SemisparseError
from semisparse.modules import context_length

DEFAULT_MAX_SEQLEN = 2048


@dataclass
class PerplexityResult:
    """Perplexity plus what it was measured on, so a number can be traced to its protocol."""

    perplexity: float
    mean_nll: float
    n_windows: int
    total_windows: int
    seqlen: int
    n_tokens: int  # tokens in the evaluated windows: n_windows * seqlen
    bos: bool = False  # every window started with the BOS token


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    """The whole text as one 1-D token stream, tokenized in one call as the reference implementations do."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


def perplexity(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM over the first `max_windows` (default all) windows of `seqlen` tokens.

    `seqlen` defaults to min(2048, the model's context length). The loss is computed in float32 from
    one batch of logits at a time, with the model temporarily in eval mode (dropout off). With
    `bos_token_id` (`semisparse.data.window_bos(tokenizer)`) a leading BOS of the stream is dropped and each
    window is that BOS followed by `seqlen` − 1 text tokens, all of which are scored.
    """
    stream = _as_stream(input_ids)
    if bos_token_id is not None and stream.numel() and int(stream[0]) == bos_token_id:
        stream = stream[1:]
    context = context_length(model)
    if seqlen is None:
        seqlen = min(DEFAULT_MAX_SEQLEN, context)
    if seqlen > context:
        raise SemisparseError(
            f"`seqlen`={seqlen} is longer than the model's context length {context}: pass `seqlen`={context} "
            "or less"
        )
    if seqlen < 2:
        raise SemisparseError(
            f"`seqlen`={seqlen} is too short: a window needs at least 2 tokens; use `seqlen`=2 or more"
        )
    if batch_size < 1:
        raise SemisparseError(f"`batch_size`={batch_size} is invalid: use 1 or more")
    if max_windows is not None and max_windows < 1:
        raise SemisparseError(
            f"`max_windows`={max_windows} is invalid: use 1 or more (or leave it unset for all)"
        )
    text_tokens = seqlen - 1 if bos_token_id is not None else seqlen
    total_windows = stream.numel() // text_tokens
    if total_windows == 0:
        raise SemisparseError(
            f"the token stream has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller `seqlen`"
        )
    n_windows = total_windows if max_windows is None else min(max_windows, total_windows)
    windows = stream[: n_windows * text_tokens].view(n_windows, text_tokens)
    if bos_token_id is not None:
        windows = torch.cat([windows.new_full((n_windows, 1), bos_token_id), windows], dim=1)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    try:
        with (
            torch.inference_mode(),
            tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar,
        ):
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)
                nll_sum += _window_losses(model, batch).sum().item()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)

    mean_nll = nll_sum / n_windows
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        n_windows=n_windows,
        total_windows=total_windows,
        seqlen=seqlen,
        n_tokens=n_windows * seqlen,
        bos=bos_token_id is not None,
    )


def _as_stream(input_ids: torch.Tensor) -> torch.Tensor:
    """Accept a 1-D stream, or a tokenizer's [1, L] output, as a 1-D CPU tensor of ids."""
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise SemisparseError(
            f"input_ids has shape {tuple(input_ids.shape)}; pass one 1-D token stream (see tokenize_text)"
        )
    return input_ids.long().cpu()


def _window_losses(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of each window in [b, seqlen]: predict tokens 1..seqlen-1.

    The last position has no target; it is masked out rather than sliced off, so the logits are never
    copied (a float32 model's logits are used in place).
    """
    logits = model(input_ids=batch, use_cache=False).logits
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return losses.view(batch.shape)[:, :-1].mean(dim=1)
