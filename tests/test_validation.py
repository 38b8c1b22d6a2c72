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
