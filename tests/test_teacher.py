"""The trainer's MaskCLIP teacher (training/teacher.py) on the tiny model: its pseudo labels are the served
pipeline's probabilities for each crop, its validation labels the served label map, its classifier one row per
class. tests/test_presets.py checks the same against the real presets at full size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelstudio_maskclip import MaskCLIP, SegmentOptions
from labelstudio_maskclip.training.teacher import CLIPTeacher
from tests.tiny import TINY_VIT

CLASSES = [("cat",), ("car", "automobile")]
BACKGROUND = [("sky",)]
OPTS = SegmentOptions(short_side=32)


@pytest.fixture(scope="module")
def seg(weights):
    return MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu", templates="simple")


def _images(seed: int = 0, b: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, 24, 40, 3), dtype=np.uint8)


def test_the_classifier_is_one_row_per_class_of_its_names_averaged(seg):
    teacher = CLIPTeacher(seg, CLASSES, BACKGROUND, OPTS)
    names = seg.name_embeddings(CLASSES + BACKGROUND)  # cat, car, automobile, sky
    torch.testing.assert_close(teacher.names, names)
    assert teacher.classes == CLASSES + BACKGROUND
    assert teacher.embeddings.shape == (3, names.shape[1])
    mean_car = torch.nn.functional.normalize((names[1] + names[2])[None], dim=1)[0]
    torch.testing.assert_close(teacher.embeddings[1], mean_car)
    torch.testing.assert_close(teacher.embeddings[[0, 2]], names[[0, 3]])


def test_stored_text_embeddings_are_used_as_given(seg):
    stored = torch.nn.functional.normalize(torch.randn(4, seg.name_embeddings(["x"]).shape[1]), dim=1).double()
    teacher = CLIPTeacher(seg, CLASSES, BACKGROUND, OPTS, embeddings=stored)
    assert teacher.names.dtype == torch.float32
    torch.testing.assert_close(teacher.names, stored.float())
    torch.testing.assert_close(teacher.embeddings[0], stored[0].float())
    x = torch.from_numpy(_images(1, 1)).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(
        teacher.probs(x)[0], seg.class_probs(_images(1, 1)[0], teacher.classes, OPTS, stored.float())
    )


def test_pseudo_labels_are_the_served_probabilities_of_each_crop_as_8_bit_pixels(seg):
    teacher = CLIPTeacher(seg, CLASSES, BACKGROUND, OPTS)
    images = _images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    probs = teacher.probs(x + 0.001)  # off the 8-bit levels: rounded back onto them
    expected = torch.stack([seg.class_probs(img, CLASSES + BACKGROUND, OPTS) for img in images])
    assert probs.dtype == torch.float32 and probs.shape[:2] == (2, 3)
    torch.testing.assert_close(probs, expected)
    over = teacher.probs(x * 4 - 1.5)  # outside [0, 1]: clamped, as a saturated image
    saturated = (np.clip(images.astype(np.float64) * 4 - 1.5 * 255, 0, 255)).round().astype(np.uint8)
    torch.testing.assert_close(over[1], seg.class_probs(saturated[1], CLASSES + BACKGROUND, OPTS), atol=1e-4, rtol=1e-4)


def test_validation_labels_are_the_served_label_map_at_the_given_threshold(seg):
    teacher = CLIPTeacher(seg, CLASSES, BACKGROUND, OPTS)
    image = _images(2, 1)[0]
    labels = teacher.label_map(image, 0.0)
    served = seg.segment([image], CLASSES, BACKGROUND, opts=OPTS, text=teacher.names)[0].labels
    assert labels.dtype == np.int64 and labels.shape == (24, 40)
    # a background class keeps its index (2 here): outside the labels 0..1, validation counts it as no label
    assert (labels == 2).any()
    np.testing.assert_array_equal(np.where(labels >= len(CLASSES), -1, labels), served)
    confidence = seg.segment([image], CLASSES, BACKGROUND, opts=OPTS)[0].confidence
    threshold = float(np.median(confidence))
    some = teacher.label_map(image, threshold)
    assert (some[confidence < threshold] == -1).all()
    np.testing.assert_array_equal(some[confidence >= threshold], labels[confidence >= threshold])


def test_the_teacher_describes_its_text_model(seg):
    assert CLIPTeacher(seg, CLASSES, (), OPTS).describe() == {
        "model": seg.clip.name,
        "pretrained": seg.clip.pretrained,
        "templates": list(seg.templates),
    }
    assert seg.clip.name and seg.clip.pretrained
