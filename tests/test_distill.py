"""distill.py: the loss against a hand computation; weight 0 is plain training, end to end."""

from __future__ import annotations

import math

import pytest
import torch

from braintumor.models.checkpoint import load_checkpoint, save_checkpoint
from braintumor.training.distill import distillation_loss, split_conflict
from braintumor.errors import UserError
from braintumor.training.trainer import train
from helpers import make_checkpoint
from helpers import tiny_config


def test_loss_matches_a_hand_computation_on_fixed_logits():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.2]])
    teacher = torch.tensor([[3.0, 0.0, 0.0], [-1.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2])
    weight, temperature = 0.3, 2.0

    def softmax(row, t):
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    hard = -sum(math.log(softmax(s, 1.0)[y]) for s, y in zip(student.tolist(), labels.tolist())) / 2
    soft = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p_t, p_s = softmax(t, temperature), softmax(s, temperature)
        soft += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    expected = (1 - weight) * hard + weight * temperature**2 * soft / 2
    got = distillation_loss(student, teacher, labels, weight=weight, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Weight 0: exactly the cross-entropy; weight 1: only the teacher's term.
    assert torch.equal(distillation_loss(student, teacher, labels, weight=0.0, temperature=4.0),
                       torch.nn.functional.cross_entropy(student, labels))
    only_soft = distillation_loss(student, teacher, labels, weight=1.0, temperature=temperature)
    assert only_soft.item() == pytest.approx(temperature**2 * soft / 2, rel=1e-6)


@pytest.mark.slow
def test_weight_zero_trains_exactly_like_no_teacher(phantom_dir, tmp_path):
    # An untrained teacher serves; its 24 px input size exercises resizing the student's 32 px batches down.
    teacher = make_checkpoint(tmp_path / "teacher.pt", image_size=24, seed=5)
    plain = train(tiny_config(phantom_dir, tmp_path / "plain", epochs=1, data_cache="memory", seed=3))
    taught = train(tiny_config(phantom_dir, tmp_path / "taught", epochs=1, data_cache="memory", seed=3,
                               teacher=str(teacher), distill_weight=0.0))
    nonzero = train(tiny_config(phantom_dir, tmp_path / "nonzero", epochs=1, data_cache="memory", seed=3,
                                teacher=str(teacher), distill_weight=0.5))
    a, b, c = (load_checkpoint(run.run_dir / "last.pt")["model"] for run in (plain, taught, nonzero))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)  # the teacher really takes part


@pytest.mark.parametrize("data_cache", ["memory", "none"])
def test_a_larger_teacher_sees_the_slices_at_its_own_size_and_the_student_a_resized_copy(
        phantom_dir, tmp_path, monkeypatch, data_cache):
    # Resizing the student's 32 px batch up to a 48 px teacher would show it blurred slices: the batches are
    # decoded and augmented at 48 px instead, and the student's copy is that batch resized down.
    from braintumor.data.transforms import eval_transform, resize_batch
    from braintumor.training.distill import Teacher
    from PIL import Image

    seen = []
    original = Teacher.logits
    monkeypatch.setattr(Teacher, "logits", lambda self, images: seen.append(images.clone()) or original(self, images))
    students = []

    def factory(arch, classes, weights):
        from braintumor.models.network import build_model

        model = build_model(arch, classes, weights)
        model.register_forward_pre_hook(lambda module, args: students.append(args[0].clone()) if module.training
                                        else None)
        return model

    teacher = make_checkpoint(tmp_path / "teacher.pt", image_size=48, seed=5)
    import braintumor.training.distill as distill_module
    import braintumor.training.trainer as train_module

    reads = []

    def counting(load):
        return lambda path, *args, **kwargs: reads.append(str(path)) or load(path, *args, **kwargs)

    for module in (distill_module, train_module):
        monkeypatch.setattr(module, "load_checkpoint", counting(module.load_checkpoint))
    train(tiny_config(phantom_dir, tmp_path / "run", epochs=1, max_steps_per_epoch=2, rotation=0.0, seed=3,
                      data_cache=data_cache, teacher=str(teacher), distill_weight=0.5), model_factory=factory)
    assert reads.count(str(teacher)) == 1  # its size, the checks and the network come from one read
    assert len(seen) == len(students) == 2
    for big, small in zip(seen, students):
        assert big.shape[-2:] == (48, 48) and small.shape[-2:] == (32, 32)
        assert torch.allclose(resize_batch(big, 32), small, atol=1e-5)  # the same slices, flipped alike
    # At 48 px the teacher's slices are decoded from the files, not upsampled from 32 px: every one is a phantom
    # of the folder at 48 px, as it is or mirrored.
    at_48 = torch.stack([eval_transform(48)(Image.open(path).convert("RGB"))
                         for path in sorted(phantom_dir.rglob("*.png"))])
    for image in torch.cat(seen):
        distance = min((image - view).abs().max().item() for x in at_48 for view in (x, x.flip(-1)))
        assert distance < 0.05
    upsampled = resize_batch(resize_batch(seen[0], 32), 48)
    assert (upsampled - seen[0]).abs().max() > 0.2  # what the teacher saw before: measurably blurred


def test_teacher_with_other_classes_is_refused(phantom_dir, tmp_path):
    other = make_checkpoint(tmp_path / "other.pt", classes=("a", "b"), image_size=32)
    with pytest.raises(UserError, match="teacher"):
        train(tiny_config(phantom_dir, tmp_path / "run", epochs=1, teacher=str(other)))


STUDENT = {"val": None, "val_split": 0.15, "seed": 0, "split_seed": None, "group_split": True, "groups": None}


def test_a_teacher_from_another_split_of_the_same_folder_is_a_conflict(tmp_path):
    data = str(tmp_path / "Training")
    same = {"data": data, "val": None, "val_split": 0.15, "seed": 0, "split_seed": None, "group_split": True}
    mine = {**STUDENT, "data": data}
    assert split_conflict(same, mine) is None
    assert split_conflict({**same, "seed": 3, "split_seed": 0}, mine) is None  # the split seed counts
    assert split_conflict({**same, "data": str(tmp_path / "other")}, mine) is None
    assert split_conflict({}, mine) is None and split_conflict(None, mine) is None
    assert "--split-seed 3 there, 0 here" in split_conflict({**same, "seed": 3}, mine)
    assert "--val-split 0.2 there" in split_conflict({**same, "val_split": 0.2}, mine)
    assert "all of" in split_conflict({**same, "val": str(tmp_path / "v")}, mine)
    # The student validates on a separate folder: only a teacher trained on that folder conflicts.
    assert "validation folder" in split_conflict(same, {**STUDENT, "data": str(tmp_path / "x"), "val": data})
    assert split_conflict(same, {**STUDENT, "data": data, "val": str(tmp_path / "v")}) is None


def test_training_refuses_a_teacher_that_trained_on_the_validation_images(phantom_dir, tmp_path):
    teacher = make_checkpoint(tmp_path / "teacher.pt", image_size=32)
    ckpt = load_checkpoint(teacher)
    ckpt.pop("format_version")
    save_checkpoint({**ckpt, "config": {"data": str(phantom_dir), "val": None, "val_split": 0.15, "seed": 1}},
                    teacher)
    with pytest.raises(UserError, match=r"may have seen this run's validation images.*--split-seed 1 there, 7 here"):
        train(tiny_config(phantom_dir, tmp_path / "run", epochs=1, teacher=str(teacher)))


def teacher_trained_on(folder, path, **config):
    """A tiny checkpoint whose recorded run trained on ``folder`` with the split settings ``config``."""
    teacher = make_checkpoint(path, image_size=32)
    ckpt = load_checkpoint(teacher)
    ckpt.pop("format_version")
    save_checkpoint({**ckpt, "config": {"data": str(folder), "val": None, "val_split": 0.15, **config}}, teacher)
    return teacher


@pytest.mark.slow
def test_a_teacher_is_judged_by_content_on_a_copy_of_its_training_folder(phantom_dir, tmp_path):
    import shutil

    from braintumor.data.index import prepare_split
    from braintumor.training.distill import check_teacher

    copy = shutil.copytree(phantom_dir, tmp_path / "copy")  # another path: the settings check cannot tell
    teacher = teacher_trained_on(phantom_dir, tmp_path / "teacher.pt", seed=0)

    def check(seed):
        student = tiny_config(copy, tmp_path / "run", seed=seed)
        check_teacher(str(teacher), student.to_dict(), prepare_split(student, False).val_paths)

    check(0)  # the copy split as the teacher split its folder: its validation images are the teacher's too
    with pytest.raises(UserError, match=r"may have seen this run's validation images: \d+ of this run's \d+ "
                                        r"validation images .* have the pixels of images it trained on in"):
        check(5)  # another split of the same images: some validated here were trained on there
    # through training too (before any epoch, nothing left behind)
    with pytest.raises(UserError, match="have the pixels of images it trained on"):
        train(tiny_config(copy, tmp_path / "run", epochs=1, seed=5, teacher=str(teacher)))
    assert not (tmp_path / "run").exists()
    # a teacher whose folder is not here records nothing to compare
    gone = teacher_trained_on(tmp_path / "gone", tmp_path / "gone.pt", seed=0)
    check_teacher(str(gone), tiny_config(copy, tmp_path / "run", seed=5).to_dict(), sorted(copy.rglob("*.png")))
