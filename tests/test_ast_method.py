"""ASTMethod on a tiny saved llama: initial masks, training steps, resume state, export, bad settings."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from semisparse import nm
from semisparse.errors import SemisparseError
from semisparse.maskfiles import MASKS_FILE, load_masks, target_shapes, to_matrix_layout
from semisparse.methods.ast import ASTConfig, ASTMethod
from semisparse.modules import find_targets, weight_matrix
from semisparse.pruning import MagnitudeConfig, SparseGPTConfig, prune
from semisparse.sparse import SLORB_FILE, attach_saved_slorb, sparse_layers

OPTIM = SimpleNamespace(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def settings(calib_file, **overrides):
    base = {"calibration": str(calib_file), "calibration_nsamples": 4, "calibration_seqlen": 32}
    return ASTConfig(**(base | overrides))


def build(dense_dir, calib_file, total_steps=8, **overrides):
    return ASTMethod.from_pretrained(
        str(dense_dir), settings(calib_file, **overrides), total_steps, "cpu", progress=False
    )


def exactly_2_4(mask):
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def train(method, steps, batch):
    optimizer = method.make_optimizer(method.parameter_groups(), OPTIM)
    losses, rows = [], []
    for step in range(steps):
        row = method.before_step(step)
        loss, metrics = method.loss(batch, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row |= method.after_step(step)
        losses.append(metrics["loss"])
        rows.append(row)
        for layer in method.layers.values():
            assert exactly_2_4(layer.mask)
    return losses, rows


def test_training_steps_lower_the_loss_and_keep_masks_2_4(dense_dir, calib_file):
    method = build(
        dense_dir,
        calib_file,
        total_steps=8,
        mask_update_every=2,
        decay_lambda=0.05,
        decay_warmup_steps=4,
        slorb=True,
    )
    assert method.teacher is not None and not method.teacher.model.training
    assert all(not p.requires_grad for p in method.teacher.model.parameters())
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    losses, rows = train(method, 8, batch)
    assert losses[-1] < 0.9 * losses[0]
    assert [row["decay_lambda"] for row in rows[:5]] == pytest.approx([0.0, 0.0125, 0.025, 0.0375, 0.05])
    assert [("flip_rate" in row) for row in rows] == [False, True] * 4
    assert all(p.grad is None for p in method.teacher.model.parameters())


def test_magnitude_init_keeps_the_dense_weights_and_sparsegpt_starts_from_its_output(dense_dir, calib_file):
    dense = {n: weight_matrix(m).detach().clone() for n, m in find_targets(make_tiny_model("llama")).items()}
    method = build(dense_dir, calib_file, alpha_kl=0.0, alpha_task=1.0)
    assert method.teacher is None
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.weight.detach(), dense[name], rtol=0, atol=0)
        torch.testing.assert_close(layer.mask, nm.nm_mask(dense[name].abs(), 2, 4))

    method = build(dense_dir, calib_file, init="sparsegpt", slorb=True, slorb_init="sum", slorb_k=16)
    reference = make_tiny_model("llama")
    ids = method.provenance["calibration"]
    assert ids["n_samples"] == 4 and ids["seqlen"] == 32
    from semisparse.data import calibration_ids

    calib, _ = calibration_ids(method.tokenizer, str(calib_file), 4, 32, 0)
    prune(reference, SparseGPTConfig(pattern="2:4"), calibration_ids=calib, progress=False)
    for name, module in find_targets(reference).items():
        layer = method.layers[name]
        torch.testing.assert_close(layer.weight.detach(), weight_matrix(module))
        assert not bool(layer.weight[~layer.mask].any())
        # SLoRB starts from the dense values SparseGPT removed, not from its zeros
        expected = (dense[name] * ~layer.mask).reshape(layer.out_features, -1, 16).sum(-1)
        torch.testing.assert_close(layer.slorb.S.detach(), expected)


def test_wanda_init_and_score_need_calibration_and_work(dense_dir, calib_file):
    method = build(dense_dir, calib_file, init="wanda", mask_score="wanda", mask_update_every=1)
    assert all(bool(norms.sum() > 0) for norms in method.updater.input_sq_norms.values())
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    train(method, 2, batch)


def test_init_from_a_pruned_directory_takes_its_zeros(tmp_path, dense_dir, calib_file):
    pruned = make_tiny_model("llama")
    prune(pruned, MagnitudeConfig(pattern="2:4"))
    pruned.save_pretrained(tmp_path / "pruned")
    method = build(dense_dir, calib_file, init=str(tmp_path / "pruned"))
    for name, module in find_targets(pruned).items():
        assert torch.equal(method.layers[name].mask, weight_matrix(module) != 0)
    make_tiny_model("llama").save_pretrained(tmp_path / "dense_again")
    with pytest.raises(SemisparseError, match="is not 2:4 sparse"):
        build(dense_dir, calib_file, init=str(tmp_path / "dense_again"))


def test_state_dict_round_trip_with_initialise_false(dense_dir, calib_file):
    method = build(dense_dir, calib_file, mask_score="wanda", init="wanda")
    resumed = ASTMethod.from_pretrained(
        str(dense_dir), settings(calib_file, mask_score="wanda", init="wanda"), 8, "cpu", initialise=False
    )
    resumed.model.load_state_dict(method.model.state_dict())
    resumed.load_state_dict(method.state_dict())
    for name in method.layers:
        assert torch.equal(resumed.updater.initial[name], method.updater.initial[name])
        torch.testing.assert_close(resumed.updater.input_sq_norms[name], method.updater.input_sq_norms[name])
        assert torch.equal(resumed.layers[name].mask, method.layers[name].mask)


@pytest.mark.parametrize(("arch", "keep_slorb"), [("llama", False), ("llama", True), ("gpt2", True)])
def test_export_writes_a_plain_model_masks_and_optional_slorb(tmp_path, calib_file, arch, keep_slorb):
    dense_dir = tmp_path / arch
    make_tiny_model(arch).save_pretrained(dense_dir)
    make_tiny_tokenizer().save_pretrained(dense_dir)
    method = build(dense_dir, calib_file, slorb=True, keep_slorb=keep_slorb, mask_update_every=1)
    train(method, 2, torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2)))
    method.model.eval()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        boosted = method.model(ids).logits
        branches = {name: layer.slorb for name, layer in method.layers.items()}
        for layer in method.layers.values():
            layer.slorb = None
        unboosted = method.model(ids).logits
        for name, layer in method.layers.items():
            layer.slorb = branches[name]
    masks = {name: layer.mask.clone() for name, layer in method.layers.items()}
    out = tmp_path / "out"
    out.mkdir()
    meta = method.export(out)
    json.dumps(meta)  # the loop writes it into semisparse.json
    assert meta["pattern"] == "2:4" and set(meta["per_layer_sparsity"]) == set(masks)
    assert meta["overall_sparsity"] == pytest.approx(0.5) and meta["slorb"]["layers"] == len(masks)
    assert not sparse_layers(method.model)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, module in find_targets(loaded).items():
        assert torch.equal(weight_matrix(module) != 0, masks[name] & (weight_matrix(module) != 0))
        assert nm.is_nm(weight_matrix(module), 2, 4)
    saved = load_masks(out / MASKS_FILE, target_shapes(loaded))
    assert set(saved) == {f"{name}.weight" for name in masks}
    for name, module in find_targets(loaded).items():
        assert torch.equal(to_matrix_layout(module, saved[f"{name}.weight"]), masks[name])
    assert (out / SLORB_FILE).is_file() == keep_slorb
    with torch.no_grad():
        if keep_slorb:
            assert attach_saved_slorb(loaded, out)
            torch.testing.assert_close(loaded(ids).logits, boosted, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(loaded(ids).logits, unboosted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decay_lambda": -1e-4}, "`decay_lambda`=-0.0001 must be >= 0"),
        ({"decay_lambda": "abc"}, "`decay_lambda`='abc' must be a number"),
        ({"init": "random"}, "neither magnitude, sparsegpt, wanda nor an existing directory"),
        ({"mask_score": "gradient"}, "ast setting `mask_score`='gradient' must be one of magnitude, wanda"),
        ({"slorb_init": "median"}, "ast setting `slorb_init`='median' must be one of auto, mean, sum, zeros"),
        ({"keep_slorb": True}, "`keep_slorb` needs `slorb`"),
        ({"alpha_task": 0.0, "alpha_kl": 0.0}, "nothing is trained"),
        ({"temperature": 0.0}, "`temperature`=0.0 must be > 0"),
        ({"mask_update_every": -1}, "`mask_update_every`=-1 must be >= 0"),
        ({"mask_update_every": 2.5}, "`mask_update_every`=2.5 must be a whole number"),
        ({"slorb_k": 0}, "`slorb_k`=0 must be >= 1"),
        ({"pattern": "4:2"}, "N must be smaller than M"),
        ({"include": 5}, "`include`=5 must be a list of str"),
        ({"include": ["model.*", 3]}, "must be a string"),
    ],
)
def test_bad_settings_are_rejected(overrides, message):
    with pytest.raises(SemisparseError, match=message.replace(".", r"\.").replace("*", r"\*")) as info:
        ASTConfig(**overrides)
    assert "\n" not in str(info.value)


def test_yaml_style_values_are_accepted():
    assert ASTConfig(decay_lambda="1e-4").decay_lambda == 1e-4
    assert ASTConfig().to_dict()["include"] == []
    assert ASTConfig(include="model.layers.0.*, *.mlp.*").include == ["model.layers.0.*", "*.mlp.*"]
    assert ASTConfig.from_mapping({"slorb": "yes", "slorb-k": "8"}).slorb_k == 8
    with pytest.raises(SemisparseError, match="unknown ast setting"):
        ASTConfig.from_mapping({"tau": 1})


def test_bad_runs_are_rejected_before_work(tmp_path, dense_dir, calib_file):
    with pytest.raises(SemisparseError, match=r"k=48 does not divide the 64 inputs of model\.layers\.0\."):
        build(dense_dir, calib_file, slorb=True, slorb_k=48)
    with pytest.raises(SemisparseError, match="teacher: model path"):
        build(dense_dir, calib_file, teacher=str(tmp_path / "missing"))
    with pytest.raises(SemisparseError, match="at least one optimizer step"):
        build(dense_dir, calib_file, total_steps=0)
    with pytest.raises(
        SemisparseError, match=r"`calibration_seqlen` 4096 exceeds.*smaller `calibration_seqlen`"
    ):
        build(dense_dir, calib_file, init="wanda", calibration_seqlen=4096)


def test_the_training_loop_runs_ast_and_resumes_bit_identically(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from train_helpers import save_tiny_model, tiny_config, write_corpus

    from semisparse.training.loop import run

    monkeypatch.setenv("SEMISPARSE_CACHE_DIR", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    ast = {"mask_update_every": 1, "decay_lambda": 0.05, "decay_warmup_steps": 2, "slorb": True}

    def method(config, initialise=True):
        return ASTMethod.from_pretrained(
            config.model, ASTConfig(**config.method), config.total_steps(), "cpu", initialise=initialise
        )

    def config(out, **extra):
        return tiny_config(model, out, corpus, steps=4, method_name="ast", method=ast, **extra)

    straight = config(tmp_path / "straight")
    whole = run(straight, method(straight), progress=False)
    first = config(tmp_path / "resumed", checkpoint_every=2, keep_checkpoints=2)
    run(first, method(first), progress=False)
    # step 2 (periodic) and step 4 (the last step's, written before the export)
    checkpoint, final = sorted((tmp_path / "resumed" / "checkpoints").iterdir())
    assert final.name == "step-00000004"
    again = config(tmp_path / "again")
    resumed = run(again, method(again, initialise=False), resume=checkpoint, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [3, 4]
    assert all("flip_rate" in row and "decay_lambda" in row for row in rows if row["kind"] == "train")
    meta = json.loads((whole / "semisparse.json").read_text())
    assert meta["method"] == "ast" and meta["pattern"] == "2:4" and meta["settings"]["slorb"] is True
    expected, actual = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    masks_a, masks_b = np.load(whole / MASKS_FILE), np.load(resumed / MASKS_FILE)
    assert all(np.array_equal(masks_a[k], masks_b[k]) for k in masks_a.files)


@pytest.mark.parametrize(
    ("init", "expected"), [("magnitude", "mean"), ("wanda", "mean"), ("sparsegpt", "zeros"), (".", "zeros")]
)
def test_auto_slorb_init_is_mean_for_dense_kept_weights_and_zeros_after_sparsegpt(init, expected):
    assert ASTConfig(init=init).slorb_init == expected
    assert ASTConfig(init=init, slorb_init="sum").slorb_init == "sum"


def test_init_pruner_facts_come_from_the_registry(monkeypatch):
    """Any registered pruner is a valid init; whether it updates the kept weights decides auto SLoRB."""
    from dataclasses import replace

    from semisparse import registry

    monkeypatch.setitem(
        registry._ENTRIES,
        ("pruner", "compensating"),
        replace(registry.lookup("pruner", "magnitude"), name="compensating", updates_kept_weights=True),
    )
    assert ASTConfig(init="compensating").slorb_init == "zeros"
    assert ASTConfig(init="compensating").init_pruner.updates_kept_weights
    assert ASTConfig(init="wanda").init_pruner.needs_calibration
