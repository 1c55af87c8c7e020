"""Data parallelism: `torchrun` with 2 CPU processes (gloo) trains exactly what one process trains on the
same global batch."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from train_helpers import isolated_cache, save_tiny_model, tiny_config, write_corpus  # noqa: F401

from semisparse.methods.dense import DenseConfig, DenseMethod
from semisparse.training.checkpoint import list_checkpoints, read_meta
from semisparse.training.loop import run


def test_two_gloo_processes_match_one_process(tmp_path, isolated_cache):  # noqa: F811
    model = save_tiny_model(tmp_path / "model", "llama")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    # One process: 4 sequences per step. Two processes: 2 each, the same 4 sequences in total.
    single = tiny_config(model, tmp_path / "single", corpus, steps=3, micro_batch=4, eval_windows=0)
    run(single, DenseMethod.from_pretrained(str(model), DenseConfig(), 0, "cpu"), progress=False)

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "semisparse", "train", "dense", str(model), "-o", str(tmp_path / "pair")]
    command += [
        "--corpus",
        str(corpus),
        "--tokens",
        str(single.tokens),
        "--seq-len",
        "32",
        "--micro-batch",
        "2",
    ]
    command += [
        "--lr",
        str(single.lr),
        "--warmup-steps",
        "1",
        "--eval-windows",
        "0",
        "--checkpoint-every",
        "2",
    ]
    command += ["--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMISPARSE_CACHE_DIR": str(isolated_cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved ") == 1  # only rank 0 reports (and writes)

    expected = load_file(tmp_path / "single" / "model" / "model.safetensors")
    paired = load_file(tmp_path / "pair" / "model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(paired[name], tensor, rtol=1e-4, atol=1e-6)
    (step, path), *_ = list_checkpoints(tmp_path / "pair")  # the last step's, written before the export
    assert step == 3 and read_meta(path)["fields"]["world_size"] == 2
    state = torch.load(path / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["data_position"] == 3 * 4
