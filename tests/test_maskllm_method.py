"""MaskLLM as a training method: regulariser sign, schedules, optimisation, resume state, export, settings."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from semisparse.errors import SemisparseError
from semisparse.maskfiles import save_masks
from semisparse.maskllm import (
    LearnableMaskLinear,
    attach_learnable_masks,
    final_masks,
    learnable_layers,
    memory_per_weight,
    regulariser,
    set_schedule,
)
from semisparse.maskllm.prior import one_shot_masks
from semisparse.methods.maskllm import FLIP_EVERY, MaskLLMConfig, MaskLLMMethod
from semisparse.modules import find_targets, weight_matrix
from semisparse.nm import NMPattern
from semisparse.pruning import MagnitudeConfig

TOTAL_STEPS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("maskllm") / "dense"
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} the sparse model number {i}." for i in range(600)))
    return path


def build(model_dir, total_steps=TOTAL_STEPS, **settings):
    settings.setdefault("prior", "magnitude")
    return MaskLLMMethod.from_pretrained(
        str(model_dir), MaskLLMConfig(**settings), total_steps, "cpu", progress=False
    )


def optim(lr=5e-4):
    """The run's optimizer settings: `lr` is the peak lr of the logits (MaskLLM's default 5e-4)."""
    return SimpleNamespace(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 32), generator=generator)


def train(method, steps, data, lr=5e-4):
    method.model.train()
    optimizer = method.make_optimizer(method.parameter_groups(), optim(lr))
    rows = []
    for step in range(steps):
        method.before_step(step)
        loss, metrics = method.loss(data, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rows.append({**metrics, **method.after_step(step)})
    return optimizer, rows


class OneLayer(nn.Module):
    def __init__(self, weight):
        super().__init__()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        self.proj = LearnableMaskLinear.from_module(linear, NMPattern(2, 4))

    def forward(self, x):
        return self.proj(x)


def test_regulariser_is_the_sampled_masked_weight_norm_and_its_gradient_favours_large_weights():
    weight = torch.tensor([[0.1, 3.0, -2.0, 0.2, -1.5, 0.05, 0.3, 2.5]])
    model = OneLayer(weight).train()
    set_schedule(model, tau=100.0, kappa=1.0, hard=False)  # nearly uniform sample: a clean gradient sign
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    model(x)
    torch.manual_seed(0)
    mask = model.proj.sample_mask().detach()
    reg = regulariser(model)
    torch.testing.assert_close(reg, (weight * mask).square().sum())
    lam = 1e-2
    (-lam * reg).backward()  # the loss subtracts λ·R
    descent = -model.proj.logits.grad[0]
    # Gradient descent raises the logit of the candidate keeping the two largest |w|: {1, 2} and {0, 3}.
    assert descent.argmax(-1).tolist() == [3, 2]
    assert descent[0, 3] > 0 and descent[1, 2] > 0
    assert model.proj.weight.grad is None


def test_regulariser_needs_a_training_forward():
    model = OneLayer(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="training forward"):
        regulariser(model)


def test_loss_is_cross_entropy_minus_lambda_times_regulariser(model_dir):
    method = build(model_dir)
    method.model.train()
    method.before_step(0)
    loss, metrics = method.loss(batch(), 0)
    assert metrics["loss"] == pytest.approx(metrics["loss_task"] - 1e-5 * metrics["regulariser"], rel=1e-6)
    assert loss.item() == pytest.approx(metrics["loss"])
    assert metrics["regulariser"] > 0


def test_schedules_are_linear_from_start_to_end(model_dir):
    method = build(model_dir, total_steps=5)
    first, middle, last = method.before_step(0), method.before_step(2), method.before_step(4)
    assert first == pytest.approx({"tau": 4.0, "kappa": 100.0, "reg_lambda": 1e-5})
    assert middle == pytest.approx({"tau": (4 + 0.05) / 2, "kappa": 300.0, "reg_lambda": 5e-6})
    assert last == pytest.approx({"tau": 0.05, "kappa": 500.0, "reg_lambda": 0.0})
    assert all(layer.tau == pytest.approx(0.05) for layer in learnable_layers(method.model).values())
    assert all(layer.kappa == pytest.approx(500.0) for layer in learnable_layers(method.model).values())


def test_only_logits_are_optimised_with_adamw_095_and_no_decay(model_dir):
    method = build(model_dir)
    groups = method.parameter_groups()
    layers = learnable_layers(method.model)
    assert len(groups) == 1 and "lr" not in groups[0] and groups[0]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(layer.logits) for layer in layers.values()}
    trainable = {name for name, p in method.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.logits" for name in layers}
    optimizer = method.make_optimizer(groups, optim(5e-4))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert optimizer.param_groups[0]["lr"] == 5e-4  # the run's lr is the logits' lr
    assert MaskLLMConfig.train_defaults == {"warmup_steps": 0, "lr": 5e-4}


def test_a_few_optimisation_steps_lower_the_loss_and_leave_the_weights_frozen(model_dir):
    method = build(model_dir)
    frozen = {k: v.clone() for k, v in method.model.state_dict().items() if not k.endswith(".logits")}
    data = batch()

    def loss_with_fixed_noise():
        with torch.no_grad():
            torch.manual_seed(123)
            method.before_step(0)
            return method.loss(data, 0)[0].item()

    method.model.train()
    before = loss_with_fixed_noise()
    optimizer, rows = train(method, TOTAL_STEPS, data, lr=1e-2)
    after = loss_with_fixed_noise()
    assert after < before - 0.05
    state = method.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    logits = {id(layer.logits) for layer in learnable_layers(method.model).values()}
    assert {id(p) for p in optimizer.state} == logits
    assert all(1 / 6 <= row["mean_max_prob"] <= 1 for row in rows)
    flips = [step for step, row in enumerate(rows) if "flip_vs_prior" in row]
    assert flips == [FLIP_EVERY - 1, TOTAL_STEPS - 1] and all(
        0 <= rows[s]["flip_vs_prior"] <= 1 for s in flips
    )
    assert rows[-1]["mean_max_prob"] > rows[0]["mean_max_prob"]
    assert rows[-1]["tau"] == pytest.approx(0.05)


def test_state_dict_round_trip_restores_the_run(model_dir, tmp_path):
    method = build(model_dir)
    train(method, 3, batch(), lr=1e-2)
    torch.save({"model": method.model.state_dict(), "method": method.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = MaskLLMMethod.from_pretrained(
        str(model_dir), method.settings, TOTAL_STEPS, "cpu", initialise=False, progress=False
    )
    resumed.model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["method"])
    assert resumed.prior_info == method.prior_info
    for name, index in method.prior_indices.items():
        assert torch.equal(resumed.prior_indices[name], index)
    restored, original = resumed.after_step(FLIP_EVERY - 1), method.after_step(FLIP_EVERY - 1)
    assert math.isnan(restored.pop("mean_max_prob"))  # no sample drawn yet after a resume
    original.pop("mean_max_prob")
    assert restored == original
    method.model.eval()
    resumed.model.eval()
    assert torch.equal(method.model(batch(1)).logits, resumed.model(batch(1)).logits)


def test_mismatched_method_state_is_rejected(model_dir):
    method = build(model_dir)
    state = method.state_dict()
    name = next(iter(state["prior_indices"]))
    del state["prior_indices"][name]
    with pytest.raises(SemisparseError, match="does not match this model's layers"):
        method.load_state_dict(state)
    state = method.state_dict()
    state["prior_indices"][name] = state["prior_indices"][name][:1]
    with pytest.raises(SemisparseError, match=f"prior for {name.replace('.', '[.]')} has shape"):
        method.load_state_dict(state)


def test_export_writes_a_plain_masked_model_and_public_masks(model_dir, tmp_path):
    method = build(model_dir)
    train(method, 2, batch(), lr=1e-2)
    expected = final_masks(method.model)
    meta = method.export(tmp_path)
    assert isinstance(next(iter(learnable_layers(method.model).values())), LearnableMaskLinear)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    dense_targets = find_targets(dense)
    for name, module in find_targets(exported).items():
        assert type(module) is nn.Linear
        mask = expected[f"{name}.weight"]
        assert torch.equal(module.weight, dense_targets[name].weight * mask)
    with np.load(tmp_path / "masks.npz") as archive:
        assert sorted(archive.files) == sorted(f"{name}.mask" for name in expected)
        for name, mask in expected.items():
            assert np.array_equal(archive[f"{name}.mask"], np.packbits(mask.numpy().reshape(-1)))
    assert meta["method"] == "maskllm" and meta["pattern"] == "2:4"
    assert meta["overall_sparsity"] == pytest.approx(0.5)
    assert meta["prior"] == {"source": "magnitude", "calibration": None}
    assert meta["mask_memory_bytes_per_weight"]["logits"] == pytest.approx(6.0)
    json.dumps(meta)


def test_sparsegpt_prior_uses_calibration_data(model_dir, calib_file):
    method = build(
        model_dir,
        prior="sparsegpt",
        calibration=str(calib_file),
        calibration_nsamples=4,
        calibration_seqlen=32,
    )
    assert method.prior_info["source"] == "sparsegpt"
    assert method.prior_info["calibration"]["n_samples"] == 4
    with pytest.raises(SemisparseError, match="exceeds the model's context of 256"):
        build(model_dir, prior="wanda", calibration=str(calib_file), calibration_seqlen=512)


def test_prior_mask_file_is_the_transfer_prior(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    masks, _ = one_shot_masks(model, None, MagnitudeConfig(pattern="2:4"), progress=False)
    masks = {name: mask.flip(-1) for name, mask in masks.items()}  # a prior magnitude would not pick
    save_masks(masks, tmp_path / "general.npz")
    method = build(model_dir, prior="sparsegpt", prior_mask=str(tmp_path / "general.npz"), alpha=20.0)
    assert method.prior_info["source"] == "mask_file"
    for name, mask in final_masks(method.model).items():
        assert torch.equal(mask, masks[name])
    assert method.after_step(FLIP_EVERY - 1)["flip_vs_prior"] == 0.0


def test_no_prior_starts_from_random_logits(model_dir):
    method = build(model_dir, prior="none")
    assert method.prior_info == {"source": "none"}
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    magnitude, _ = one_shot_masks(dense, None, MagnitudeConfig(pattern="2:4"), progress=False)
    agree = np.mean([bool(torch.equal(m, magnitude[n])) for n, m in final_masks(method.model).items()])
    assert agree == 0.0
    assert method.after_step(FLIP_EVERY - 1)["flip_vs_prior"] == 0.0


def test_joint_mode_trains_weights_with_distillation(model_dir):
    pytest.importorskip("semisparse.training.distill")
    method = build(model_dir, train_weights=True, weight_lr=1e-3, distill=True, alpha_kl=1.0)
    groups = method.parameter_groups()
    assert [g["name"] for g in groups] == ["logits", "weights"] and groups[1]["lr"] == 1e-3
    layer = next(iter(learnable_layers(method.model).values()))
    before = layer.weight.detach().clone()
    teacher_before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
    _, rows = train(method, 2, batch(), lr=1e-2)
    assert "loss_kl" in rows[0] and rows[0]["loss_kl"] >= 0
    assert not torch.equal(layer.weight, before)
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.model.state_dict().items())
    assert method.teacher.model.training is False


def test_memory_per_weight_counts_logits_and_adam_state(model_dir):
    model = build(model_dir).model
    memory = memory_per_weight(model)
    assert memory == pytest.approx(
        {"weight": 4.0, "logits": 6.0, "gradients": 6.0, "optimizer": 12.0, "total": 28.0}
    )
    joint = memory_per_weight(model, train_weights=True)
    assert joint["gradients"] == pytest.approx(10.0) and joint["total"] == pytest.approx(4 + 6 + 3 * 10)


BAD_SETTINGS = [
    ({"pattern": "4:2"}, "N must be smaller than M"),
    ({"pattern": "two:four"}, "write it as N:M"),
    ({"prior": "owl"}, "unknown prior 'owl': use one of none, magnitude"),
    ({"prior_mask": 5}, "`prior_mask`=5 must be a string or None"),
    ({"tau_end": 0}, "`tau_end`=0.0 must be > 0"),
    ({"kappa_start": -1.0}, "`kappa_start`=-1.0 must be > 0"),
    ({"reg_start": -1e-5}, "`reg_start`=-1e-05 must be >= 0"),
    ({"weight_lr": 0.0}, "`weight_lr`=0.0 must be > 0"),
    ({"alpha": math.nan}, "`alpha`=nan must be a finite number"),
    ({"alpha": math.inf}, "`alpha`=inf must be a finite number"),
    ({"temperature": 0}, "maskllm setting `temperature`=0.0 must be > 0"),
    ({"calibration_nsamples": 0}, "`calibration_nsamples`=0 must be >= 1"),
    ({"calibration_seqlen": 2.5}, r"`calibration_seqlen`=2\.5 must be a whole number"),
    ({"hard": "maybe"}, "`hard`='maybe' must be true or false"),
    ({"calibration": ""}, "`calibration` must name c4, wikipedia or a text file"),
    ({"distill": True, "alpha_task": 0.0, "alpha_kl": 0.0}, "both 0"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_SETTINGS, ids=[str(c) for c, _ in BAD_SETTINGS])
def test_bad_settings_are_rejected_with_one_line(changes, message):
    with pytest.raises(SemisparseError, match=message) as info:
        MaskLLMConfig(**changes)
    assert "\n" not in str(info.value)


def test_settings_round_trip_and_unknown_keys():
    settings = MaskLLMConfig(pattern="4:8", prior="wanda", alpha=1.5, hard=True)
    assert MaskLLMConfig.from_mapping(settings.to_dict()) == settings
    assert settings.to_dict()["pattern"] == "4:8"
    assert MaskLLMConfig.from_mapping({"hard": "yes", "alpha": "2", "prior_mask": "none"}).hard is True
    with pytest.raises(SemisparseError, match="unknown maskllm setting"):
        MaskLLMConfig.from_mapping({"temprature": 2.0})
    with pytest.raises(SemisparseError, match=r"unknown maskllm setting\(s\) lr"):
        MaskLLMConfig.from_mapping({"lr": 1e-3})  # the run's `lr` is the logits' lr


def test_any_registered_pruner_is_a_prior(monkeypatch):
    from dataclasses import replace

    from semisparse import registry

    monkeypatch.setitem(
        registry._ENTRIES,
        ("pruner", "other"),
        replace(registry.lookup("pruner", "magnitude"), name="other"),
    )
    assert MaskLLMConfig(prior="other").prior == "other"


def test_total_steps_must_be_positive(model_dir):
    with pytest.raises(SemisparseError, match="total_steps must be at least 1"):
        build(model_dir, total_steps=0)


def test_targets_of_another_pattern_are_rejected(tmp_path):
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert weight_matrix(find_targets(model)["model.layers.0.mlp.down_proj"]).shape[1] == 128
    with pytest.raises(SemisparseError, match="not a multiple of 48"):
        build(tmp_path / "m", pattern="2:48")


def test_regulariser_and_gradients_survive_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_model("llama")
        layers = attach_learnable_masks(model, NMPattern(2, 4))
        model.requires_grad_(False)
        for layer in layers.values():
            layer.logits.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable()  # non-reentrant: the forward reruns with the same noise
        model.train()
        set_schedule(model, tau=2.0, kappa=100.0, hard=False)
        torch.manual_seed(0)
        out = model(input_ids=batch(), labels=batch())
        (out.loss - 1e-2 * regulariser(model)).backward()
        grads.append(torch.cat([layer.logits.grad.flatten() for layer in layers.values()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
