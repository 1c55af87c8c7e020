"""Distillation losses against values computed by hand."""

import math

import pytest
import torch

from semisparse.errors import SemisparseError
from semisparse.training.distill import distillation_loss, layerwise_loss


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_loss_equals_a_hand_computed_value():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [-9.0, 0.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1]])
    T, a_task, a_kl = 2.0, 0.3, 0.7
    ce = kl = 0.0
    for pos in range(2):  # the last position predicts nothing
        p = softmax(student[0, pos].tolist())
        ce -= math.log(p[ids[0, pos + 1]])
        ps = softmax([v / T for v in student[0, pos].tolist()])
        pt = softmax([v / T for v in teacher[0, pos].tolist()])
        kl += sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps, strict=True))
    expected = a_task * ce / 2 + a_kl * T**2 * kl / 2
    loss, metrics = distillation_loss(student, teacher, ids, a_task, a_kl, T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss_task"] == pytest.approx(ce / 2, rel=1e-6)
    assert metrics["loss_kl"] == pytest.approx(kl / 2, rel=1e-6)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_when_teacher_equals_student_and_last_position_is_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    loss, metrics = distillation_loss(logits, logits.clone(), ids, 1.0, 0.5)
    assert metrics["loss_kl"] == pytest.approx(0.0, abs=1e-7)
    task, _ = distillation_loss(logits, None, ids, 1.0, 0.0)
    torch.testing.assert_close(loss, task)
    changed = logits.clone()
    changed[:, -1] = 100.0
    again, _ = distillation_loss(changed, logits, ids, 1.0, 0.5)
    torch.testing.assert_close(again, loss)


def test_bf16_logits_are_computed_in_float32_and_gradients_flow():
    torch.manual_seed(1)
    student = torch.randn(1, 4, 7, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(1, 4, 7, dtype=torch.bfloat16)
    loss, _ = distillation_loss(student, teacher, torch.randint(0, 7, (1, 4)), 0.33, 0.67)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and bool(student.grad[:, :-1].abs().sum() > 0)
    assert bool((student.grad[:, -1] == 0).all())


def test_kl_needs_teacher_logits():
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(torch.zeros(1, 3, 4), None, torch.zeros(1, 3, dtype=torch.long), 1.0, 0.5)


def test_layerwise_loss_hand_computed_and_zero_on_equal_states():
    student = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])]
    teacher = [torch.tensor([[1.0, 4.0]]), torch.tensor([[3.0, 1.0]])]
    # layer 1: mean((0, -2)^2) / mean(1, 16) = 2 / 8.5; layer 2: mean(9, 1) / mean(9, 1) = 1
    assert layerwise_loss(student, teacher).item() == pytest.approx(2 / 8.5 + 1.0)
    assert layerwise_loss(teacher, teacher).item() == 0.0


@pytest.mark.parametrize("batch", [1, 3])
def test_gradient_matches_autograd_through_the_formula_and_inputs_stay_untouched(batch, monkeypatch):
    import torch.nn.functional as F

    import semisparse.training.distill as distill

    monkeypatch.setattr(distill, "CHUNK_ROWS", 2)  # several chunks per sequence, one of them partial
    torch.manual_seed(2)
    student = torch.randn(batch, 6, 13, requires_grad=True)
    teacher = torch.randn(batch, 6, 13)
    ids = torch.randint(0, 13, (batch, 6))
    before = student.detach().clone(), teacher.clone()
    loss, _ = distillation_loss(student, teacher, ids, 0.33, 0.67, 2.0)
    (2.5 * loss).backward()
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])

    reference = student.detach().clone().requires_grad_(True)
    s = reference[:, :-1].reshape(-1, 13)
    t = teacher[:, :-1].reshape(-1, 13)
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    expected = 0.33 * ce + 0.67 * 4 * kl
    (2.5 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(student.grad, reference.grad)


def test_backpropagating_twice_is_a_clear_error():
    student = torch.randn(1, 3, 5, requires_grad=True)
    loss, _ = distillation_loss(student, None, torch.zeros(1, 3, dtype=torch.long), 1.0, 0.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_huge_logit_gaps_stay_finite_and_match_float64():
    """Logits thousands apart underflow every probability but the top one; both terms must stay exact."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    student = torch.randn(1, 5, 9) * 3000
    teacher = torch.randn(1, 5, 9) * 3000
    ids = torch.randint(0, 9, (1, 5))
    loss, metrics = distillation_loss(student, teacher, ids, 0.5, 0.5, 2.0)
    s, t = student[0, :-1].double(), teacher[0, :-1].double()
    ce = F.cross_entropy(s, ids[0, 1:])
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    assert math.isfinite(loss.item())
    assert metrics["loss_task"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["loss_kl"] == pytest.approx(kl.item(), rel=1e-5)


def test_teacher_from_disk_or_from_the_student_is_frozen_and_equal(dense_dir):
    from conftest import make_tiny_model

    from semisparse.errors import SemisparseError
    from semisparse.training.distill import Teacher

    student = make_tiny_model("llama")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    loaded = Teacher.from_model(str(dense_dir), student, "cpu")
    copied = Teacher.from_model(student)
    assert loaded.source == str(dense_dir)
    for teacher in (loaded, copied):
        assert not teacher.model.training and all(not p.requires_grad for p in teacher.model.parameters())
        assert teacher.model is not student
        with torch.no_grad():
            torch.testing.assert_close(teacher(ids).logits, student(ids).logits)
    assert copied(ids, hidden_states=True).hidden_states is not None
    with pytest.raises(SemisparseError, match="teacher: "):
        Teacher.from_model(str(dense_dir / "missing"), student)
    other = make_tiny_model("gpt2")
    other.resize_token_embeddings(128)
    with pytest.raises(SemisparseError, match="has 128 output tokens, the student 256"):
        Teacher.from_model(other, student)


def test_distiller_is_the_distillation_loss_of_student_and_teacher_outputs():
    from conftest import make_tiny_model

    from semisparse.training.distill import Distiller, Teacher

    student, teacher_model = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    teacher = Teacher(teacher_model, "seed 1")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    loss, metrics = Distiller(teacher, 0.3, 0.7, 2.0, layerwise=0.5).loss(student, ids)
    out = student(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        taught = teacher_model(input_ids=ids, output_hidden_states=True)
    expected, _ = distillation_loss(out.logits, taught.logits, ids, 0.3, 0.7, 2.0)
    layers = layerwise_loss(out.hidden_states[1:], taught.hidden_states[1:])
    torch.testing.assert_close(loss, expected + 0.5 * layers)
    assert metrics["loss_layerwise"] == pytest.approx(layers.item())
    assert metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert all(p.grad is None for p in teacher_model.parameters())
    plain, parts = Distiller(None, 1.0).loss(student, ids)
    torch.testing.assert_close(plain, student(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    assert "loss_kl" not in parts
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(None, 1.0, 0.5)


def test_dense_fine_tuning_can_distil_from_its_starting_point(dense_dir):
    from semisparse.methods.dense import DenseConfig, DenseMethod

    plain = DenseMethod.from_pretrained(str(dense_dir), DenseConfig(), 1, "cpu")
    assert plain.teacher is None
    distilled = DenseMethod.from_pretrained(
        str(dense_dir), DenseConfig(distill=True, alpha_task=0.5, alpha_kl=0.5), 1, "cpu"
    )
    assert distilled.teacher is not None and distilled.teacher.model is not distilled.model
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    loss, metrics = distilled.loss(ids, 0)
    # The teacher starts equal to the student, so the KL term starts at zero.
    assert metrics["loss_kl"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(loss, 0.5 * plain.loss(ids, 0)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(SemisparseError, match="both 0"):
        DenseConfig(distill=True, alpha_task=0, alpha_kl=0)
