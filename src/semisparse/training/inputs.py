"""What a run trains and evaluates on, loaded before its output directory is touched: the corpus as packed
sequences, the evaluation windows, and the pins of corpus and base model that every checkpoint records;
and the evaluation itself, as the metrics row the loop logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from semisparse.data import evaluation_text
from semisparse.evaluation.perplexity import perplexity, tokenize_text
from semisparse.training import checkpoint, distributed
from semisparse.training.config import TrainConfig
from semisparse.training.corpus import PackedSequences, load_token_stream, resolve_corpus


@dataclass
class RunInputs:
    sequences: PackedSequences
    corpus_info: dict[str, Any]  # the corpus's provenance (`load_token_stream`)
    pins: dict[str, Any]  # {"corpus": {sha256, tokenizer_key, tokens}, "model": {path, sha256}}


def load_inputs(
    config: TrainConfig, tokenizer: Any, info: distributed.Distributed, progress: bool
) -> RunInputs:
    """The corpus as token stream, and the pins of corpus and base model that checkpoints record.

    The main rank tokenises and hashes first, so the other ranks find both in the caches."""
    source = resolve_corpus(config.corpus)
    if info.is_main:
        stream, corpus_info = load_token_stream(source, tokenizer, progress)
        model = checkpoint.model_identity(config.model)
    distributed.barrier(info)
    if not info.is_main:
        stream, corpus_info = load_token_stream(source, tokenizer, False)
        model = checkpoint.model_identity(config.model)  # hashes cached by the main rank
    sequences = PackedSequences(stream, config.seq_len, config.seed)
    corpus = {key: corpus_info[key] for key in ("sha256", "tokenizer_key", "tokens")}
    return RunInputs(sequences, corpus_info, {"corpus": corpus, "model": model})


def load_eval_ids(config: TrainConfig, tokenizer: Any) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The token ids of the evaluation windows and where their text came from (None without evaluation)."""
    if not config.eval_windows:
        return None, None
    text, source = evaluation_text(config.eval_corpus)
    return tokenize_text(tokenizer, text)[: config.eval_windows * config.effective_eval_seqlen()], source


def evaluate(
    model: torch.nn.Module,
    eval_ids: torch.Tensor,
    config: TrainConfig,
    step: int,
    tokens: int,
    bos_token_id: int | None = None,
) -> dict:
    """Perplexity on the evaluation windows after `step` steps (`tokens` trained), as a metrics row; each
    window starts with `bos_token_id` when the tokenizer adds one (`semisparse.data.window_bos`)."""
    result = perplexity(
        model,
        eval_ids,
        config.effective_eval_seqlen(),
        config.eval_windows,
        batch_size=config.micro_batch,
        progress=False,
        bos_token_id=bos_token_id,
    )
    return {
        "kind": "eval",
        "step": step,
        "tokens": tokens,
        "eval_ppl": result.perplexity,
        "eval_loss": result.mean_nll,
        "eval_windows": result.n_windows,
        "eval_seqlen": result.seqlen,
    }
