"""Shared fixtures: tiny random models of every supported family and a tiny offline tokenizer.

Other test files import `make_tiny_model` / `ARCHS` directly (`from conftest import make_tiny_model`) or
use the `tiny_model` / `tiny_tokenizer` fixtures.
"""

from __future__ import annotations

import os
import string

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads spinning against another
# process make the suite many times slower; subprocesses the tests start inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2")
VOCAB_SIZE = 256
CONTEXT = 256

_TOKENIZER_CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Sparse networks keep two of every four weights in each group of the matrix.",
    "A quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs!",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and 2048 tokens per window appear in calibration data.",
]


def _config(arch: str) -> PretrainedConfig:
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": CONTEXT,
    }
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "mistral":
        return MistralConfig(**llama_like, sliding_window=None)
    if arch == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=CONTEXT,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB_SIZE,
            n_positions=CONTEXT,
            bos_token_id=VOCAB_SIZE - 1,
            eos_token_id=VOCAB_SIZE - 1,
        )
    if arch == "gemma3":  # not in ARCHS: used where its sandwich norms (norms on sub-block outputs) matter
        return Gemma3TextConfig(
            **{**llama_like, "num_key_value_heads": 1},
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS} or gemma3")


def make_tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A 2-block random CausalLM of the given family: fp32, eval mode, same weights for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    return model.float().eval()


@pytest.fixture(params=ARCHS)
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """One tiny model per supported family (`model.config.model_type` is the arch name)."""
    return make_tiny_model(request.param)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer with at most 256 ids (so it fits the tiny models), trained offline in milliseconds.

    Saved next to a Qwen2 config, transformers 5 reloads it as Qwen2Tokenizer with another pre-tokenizer
    (different ids); next to the other archs' configs it reloads unchanged.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=[*string.printable.strip(), "▁"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer; EOS is "<eos>" and every id is below the tiny models' vocab size."""
    return make_tiny_tokenizer()


# Fixtures shared by several test files.


@pytest.fixture
def dense_dir(tmp_path):
    path = tmp_path / "dense"
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} the sparse model number {i}." for i in range(600)))
    return path


@pytest.fixture
def one_process_mesh(tmp_path):
    """A 1-process gloo mesh: enough for DTensor (FSDP2's parameter type) code paths on CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
