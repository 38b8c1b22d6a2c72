"""Validation's teacher labels and promotion gate, at the points mutation testing found unchecked
(docs/mutation.md): what the teacher is shown, how its answer is put back on the image, and the reasons a
decision gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelstudio_maskclip.training import validation as tv


class GridTeacher:
    """A teacher with MaskCLIP's interface that answers fixed class probabilities on a coarse grid, whatever
    the image, and keeps every batch it was shown."""

    def __init__(self, grid: torch.Tensor):
        self.grid = grid  # (C, h, w)
        self.embeddings = torch.eye(grid.shape[0])
        self.seen: list[torch.Tensor] = []

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return self.grid[None].expand(images.shape[0], -1, -1, -1)

    def describe(self) -> dict:
        return {"model": "grid", "pretrained": "none", "templates": []}


def test_teacher_labels_put_the_teachers_grid_back_on_the_image_half_pixel_centred():
    """A 1x2 grid (left "0", right "1") on a 2x4 image: bilinear upsampling with pixel centres aligned
    (align_corners=False) gives probabilities 1, .75, .25, 0 for "0"; a pixel is unlabelled (-1) only
    below the threshold, so at .75 every pixel keeps its label and at .8 the middle two lose it."""
    teacher = GridTeacher(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    image = np.zeros((2, 4, 3), np.uint8)
    at_75 = tv.teacher_labels(teacher, image, 0, 0.75)
    assert at_75.dtype == np.int64 and at_75.shape == (2, 4)
    np.testing.assert_array_equal(at_75, [[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(tv.teacher_labels(teacher, image, 0, 0.8), [[0, -1, -1, 1], [0, -1, -1, 1]])


def test_the_teacher_sees_rgb_in_0_1_resized_to_the_short_side():
    teacher = GridTeacher(torch.ones(1, 1, 1))
    image = np.zeros((40, 60, 3), np.uint8)
    image[..., 0] = 255  # red
    labels = tv.teacher_labels(teacher, image, 20, 0.0)
    assert labels.shape == (40, 60) and (labels == 0).all()
    shown = teacher.seen[-1]
    assert shown.shape == (1, 3, 20, 30)  # the short side 40 -> 20, the long side in proportion
    torch.testing.assert_close(shown[0, 0], torch.ones(20, 30))  # red channel at 1.0: 255 / 255
    torch.testing.assert_close(shown[0, 1:], torch.zeros(2, 20, 30))
    tv.teacher_labels(teacher, image, 0, 0.0)  # no short side: the image as it is
    assert teacher.seen[-1].shape == (1, 3, 40, 60) and (teacher.seen[-1][0, 0] == 1.0).all()
    tall = np.full((90, 30, 3), 255, np.uint8)
    tv.teacher_labels(teacher, tall, 20, 0.0)
    assert teacher.seen[-1].shape == (1, 3, 60, 20)  # the short side is the width here


def test_the_teacher_sees_a_downscaled_image_antialiased():
    """Every third column white, scaled down 3x: antialiased, each pixel averages its neighbourhood (a third
    white on average); without antialiasing bilinear sampling hits only the black columns."""
    teacher = GridTeacher(torch.ones(1, 1, 1))
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, ::3] = 255
    tv.teacher_labels(teacher, image, 10, 0.0)
    shown = teacher.seen[-1]
    assert shown.shape == (1, 3, 10, 20)
    assert shown.mean().item() == pytest.approx(1 / 3, abs=0.05)


def test_scores_as_dict_names_each_contender():
    scores = tv.Scores(candidate=0.7, teacher=0.4, current=0.6, current_version="maskclip+-3")
    assert scores.as_dict() == {"candidate": 0.7, "teacher": 0.4, "current": 0.6, "current_version": "maskclip+-3"}


class MapTeacher:
    """A teacher that labels whole images itself (as MaskCLIP's ``label_map`` does): "1" where the red channel
    is bright, and remembers the threshold it was given."""

    def __init__(self):
        self.thresholds: list[float] = []

    def label_map(self, image: np.ndarray, min_conf: float) -> np.ndarray:
        self.thresholds.append(min_conf)
        return (image[..., 0] > 127).astype(np.int64)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a teacher with a label map labels the image itself")


def test_a_teacher_with_its_own_label_map_labels_the_image_as_served():
    teacher = MapTeacher()
    image = np.zeros((6, 9, 3), np.uint8)
    image[:, 4:, 0] = 255
    labels = tv.teacher_labels(teacher, image, 3, 0.4)
    np.testing.assert_array_equal(labels, (np.arange(9) >= 4)[None].repeat(6, 0))
    assert teacher.thresholds == [0.4]


# --- the three contenders on the held-out tasks --------------------------------------------------------------

CLASSES = [("disc",), ("box",), ("ground",)]


def _held_out(tmp_path, n: int = 2) -> list:
    """Held-out items: 8 x 8 images, people's labels "disc" on the top six rows, "box" on the bottom two."""
    from labelstudio_maskclip.training.data import Item

    gt = np.zeros((8, 8), np.uint8)
    gt[6:] = 1
    items = []
    for i in range(n):
        np.save(image := tmp_path / f"img{i}.npy", np.random.default_rng(i).integers(0, 256, (8, 8, 3), np.uint8))
        np.save(labels := tmp_path / f"lab{i}.npy", gt)
        items.append(Item(i, image, labels))
    return items


DISC_EVERYWHERE = (0.75 + 0.0) / 2  # disc: 48 of 64 pixels; box: 0 (ground counts nowhere)
BOX_EVERYWHERE = (0.0 + 0.25) / 2


def _validate(tmp_path, candidate_class: int, *, teacher_p: float = 0.6, **settings):
    from labelstudio_maskclip import SegmentOptions
    from labelstudio_maskclip.settings import Settings
    from labelstudio_maskclip.training.student import StudentModel
    from tests.test_learning_loop import _embeddings, constant_student

    s = Settings(model_dir=str(tmp_path / "md"), device="cpu", **settings)
    candidate = StudentModel(constant_student(_embeddings(3), candidate_class), CLASSES)
    grid = torch.full((3, 1, 1), (1 - teacher_p) / 2)
    grid[1] = teacher_p  # "box" everywhere, with probability teacher_p
    teacher = GridTeacher(grid)
    opts = SegmentOptions(short_side=16, min_confidence=settings.get("min_confidence", 0.0))
    scores = tv.validate(s, candidate, teacher, _held_out(tmp_path), torch.device("cpu"), opts)
    return scores, teacher


def test_the_served_student_is_scored_in_the_candidates_label_order(tmp_path):
    """The served student was trained with the labels in the reverse order and answers "ground" everywhere
    (its class 0): it is scored as "ground" (0), not as the candidate's class 0 ("disc")."""
    from tests.test_learning_loop import _embeddings, _promote, constant_student

    served = _promote(tmp_path / "md", constant_student(_embeddings(3, seed=1), 0), CLASSES[::-1])
    scores, teacher = _validate(tmp_path, 0, short_side=4, min_confidence=0.5)
    assert scores == tv.Scores(candidate=DISC_EVERYWHERE, teacher=BOX_EVERYWHERE, current=0.0, current_version=served)
    assert [x.shape for x in teacher.seen] == [(1, 3, 4, 4)] * 2  # the settings' short side: 8 -> 4
    candidate_box, _ = _validate(tmp_path, 1)
    assert candidate_box.candidate == BOX_EVERYWHERE and candidate_box.current == 0.0
    served_disc = _promote(tmp_path / "md", constant_student(_embeddings(3, seed=1), 2), CLASSES[::-1])
    scores, _ = _validate(tmp_path, 1)
    assert scores.current == DISC_EVERYWHERE and scores.current_version == served_disc


def test_the_served_options_and_threshold_apply_to_every_contender(tmp_path):
    """At a threshold above every contender's confidence nothing is labelled: each scores 0, teacher too."""
    from tests.test_learning_loop import _embeddings, _promote, constant_student

    _promote(tmp_path / "md", constant_student(_embeddings(3, seed=1), 2), CLASSES[::-1])
    scores, teacher = _validate(tmp_path, 0, short_side=0, min_confidence=0.99999)
    assert (scores.candidate, scores.teacher, scores.current) == (0.0, 0.0, 0.0)
    assert [x.shape for x in teacher.seen] == [(1, 3, 8, 8)] * 2  # no short side: the image as it is
    scores, _ = _validate(tmp_path, 0, teacher_p=0.6, min_confidence=0.55)
    assert (scores.candidate, scores.teacher, scores.current) == (DISC_EVERYWHERE, BOX_EVERYWHERE, DISC_EVERYWHERE)


def test_no_served_student_is_compared_unless_it_loads_and_has_these_labels(tmp_path):
    from labelstudio_maskclip.training import checkpoints as ck
    from tests.test_learning_loop import _embeddings, _promote, constant_student

    scores, _ = _validate(tmp_path, 0)  # none served
    assert (scores.current, scores.current_version) == (None, None) and scores.candidate == DISC_EVERYWHERE
    _promote(tmp_path / "md", constant_student(_embeddings(2), 0), CLASSES[:2])  # other labels
    assert _validate(tmp_path, 0)[0].current_version is None
    with_sky = _promote(tmp_path / "md", constant_student(_embeddings(3), 0), CLASSES)
    ck.checkpoint_path(tmp_path / "md", with_sky).write_bytes(b"torn")  # the right labels, but unreadable
    assert _validate(tmp_path, 0)[0].current_version is None


@pytest.mark.parametrize(
    ("args", "promoted", "reason"),
    [
        (("always", None, None, None, 0), True, "promoted: MASKCLIP_PROMOTE=always"),
        (
            ("better", 0.9, 0.1, None, 3),
            False,
            "not promoted: only 3 held-out annotated task(s) (< 4) to validate on; "
            "set MASKCLIP_PROMOTE=always to serve an unvalidated student",
        ),
        (("better", None, 0.1, None, 9), False, "not promoted: only 9 held-out"),
        (("better", 0.6, 0.5, None, 4), True, "promoted: candidate mIoU 0.6000 beats teacher (0.5)"),
        (("better", 0.6, 0.5, 0.55, 4), True, "promoted: candidate mIoU 0.6000 beats current student (0.55)"),
        (("better", 0.6, 0.65, 0.55, 4), False, "not promoted: candidate mIoU 0.6000 <= teacher 0.6500"),
        (("better", 0.6, None, 0.6, 4), False, "not promoted: candidate mIoU 0.6000 <= current student 0.6000"),
        (("better", 0.6, None, None, 4), True, "promoted: candidate mIoU 0.6000 beats nothing (None)"),
    ],
)
def test_each_decision_gives_its_reason(args, promoted, reason):
    ok, why = tv.decide(*args)
    assert ok is promoted and why.startswith(reason), why
