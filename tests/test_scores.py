"""The image score Label Studio sorts by (MASKCLIP_SCORE): confidence, margin, normalised entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelstudio_maskclip.engine import segmenter as seg_mod
from labelstudio_maskclip.engine.segmenter import SCORES
from labelstudio_maskclip.settings import SCORES as SETTINGS_SCORES
from labelstudio_maskclip.settings import Settings, SettingsError


def _uniform_grid(pixel: list[float], h: int = 2, w: int = 2) -> torch.Tensor:
    """(K, h, w) probabilities, the same distribution ``pixel`` at every grid cell (so upsampling keeps it)."""
    return torch.tensor(pixel, dtype=torch.float32)[:, None, None].expand(len(pixel), h, w).contiguous()


@pytest.mark.parametrize(
    "pixel",
    [[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]],
)
def test_each_score_is_its_hand_computed_value(pixel):
    probs = _uniform_grid(pixel)
    p = np.asarray(pixel)
    top = np.sort(p)[::-1]
    expected = {
        "confidence": top[0],
        "margin": top[0] - top[1],
        "entropy": 1 + float((p * np.log(p)).sum()) / math.log(len(p)),
    }
    for kind in SCORES:
        seg = seg_mod._finalize(probs, (5, 7), 3, 0.0, kind)
        assert seg.score == pytest.approx(expected[kind], abs=1e-5), kind
        # per-region scores stay the mean winning probability whatever the image score
        k = int(np.argmax(p))
        assert seg.class_scores[k] == pytest.approx(top[0], abs=1e-5)


def test_scores_average_over_labelled_pixels_only():
    """Background pixels (class index >= n_labels) are no label and do not count."""
    probs = torch.zeros(3, 1, 2)
    probs[:, 0, 0] = torch.tensor([0.5, 0.3, 0.2])  # label 0 wins, margin 0.2
    probs[:, 0, 1] = torch.tensor([0.1, 0.1, 0.8])  # background (index 2 with 2 labels) wins
    seg = seg_mod._finalize(probs, (1, 2), 2, 0.0, "margin")  # (1, 2) = the grid size: no interpolation
    assert seg.labels.tolist() == [[0, -1]]
    assert seg.score == pytest.approx(0.2, abs=1e-6)
    assert seg_mod._finalize(probs, (1, 2), 2, 0.0, "confidence").score == pytest.approx(0.5, abs=1e-6)


def test_a_sure_image_scores_above_an_unsure_one_for_every_kind():
    sure, unsure = _uniform_grid([0.9, 0.06, 0.04]), _uniform_grid([0.4, 0.35, 0.25])
    for kind in SCORES:
        assert (
            seg_mod._finalize(sure, (8, 8), 3, 0.0, kind).score > seg_mod._finalize(unsure, (8, 8), 3, 0.0, kind).score
        )


def test_confidence_and_margin_can_order_images_differently():
    """Why the choice matters: a two-way tie with a clear winner over the rest vs a flat distribution."""
    tie = _uniform_grid([0.48, 0.47, 0.05])  # confident-looking max, but a coin flip between two labels
    flat = _uniform_grid([0.40, 0.30, 0.30])
    conf = [seg_mod._finalize(x, (4, 4), 3, 0.0, "confidence").score for x in (tie, flat)]
    margin = [seg_mod._finalize(x, (4, 4), 3, 0.0, "margin").score for x in (tie, flat)]
    assert conf[0] > conf[1] and margin[0] < margin[1]


@pytest.mark.parametrize("kind", SCORES)
def test_chunked_upsampling_gives_the_same_score(kind, monkeypatch):
    torch.manual_seed(0)
    probs = torch.rand(7, 5, 6).softmax(0)
    one = seg_mod._finalize(probs, (50, 61), 5, 0.0, kind)
    monkeypatch.setattr(seg_mod, "_UPSAMPLE_BUDGET", 50 * 61 * 2)  # 2 classes per interpolate call
    chunked = seg_mod._finalize(probs, (50, 61), 5, 0.0, kind)
    np.testing.assert_array_equal(one.labels, chunked.labels)
    assert chunked.score == pytest.approx(one.score, abs=1e-5)


@pytest.mark.parametrize("kind", SCORES)
@pytest.mark.parametrize(
    "budget, outputs, batches",
    [
        (2**26, 2**25, [3, 2]),  # the defaults: each size's images at once
        (2 * 6 * 6 * 61, 2**25, [2, 1, 2]),  # two images' width-upsampled grids (6 classes, 6 x 61) a batch
        (2**26, 50 * 61 + 1, [1, 1, 1, 2]),  # outputs: one 50 x 61 image a batch, or two 40 x 33
    ],
)
def test_images_finalised_together_get_what_each_gets_alone(kind, budget, outputs, batches, monkeypatch):
    """The GPU's way (a batch's images of one size at once, the union of their candidate classes) gives
    each image exactly the CPU's one-by-one result, whatever the mix of sizes and batch chunks."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6, 6, 7, generator=gen) * 4
    logits[0, 2] += 20  # image 0: class 2 wins everywhere, its only candidate
    logits[3, 4] += 6
    probs = seg_mod.prompt_denoising(logits.softmax(1), 0.3)
    sizes = [(50, 61), (40, 33), (50, 61), (50, 61), (40, 33)]
    monkeypatch.setattr(seg_mod, "_BATCH_UPSAMPLE_BUDGET", budget)
    monkeypatch.setattr(seg_mod, "_BATCH_OUTPUT_PIXELS", outputs)
    monkeypatch.setattr(seg_mod, "_UPSAMPLE_BUDGET", 2 * 6 * 61 * 9)  # several bands of rows
    alone = seg_mod._finalize_all(probs, sizes, 5, 0.2, kind, together=False)
    inner, calls = seg_mod._finalize_batch, []
    monkeypatch.setattr(seg_mod, "_finalize_batch", lambda p, *args: calls.append(len(p)) or inner(p, *args))
    together = seg_mod._finalize_all(probs, sizes, 5, 0.2, kind, together=True)
    assert calls == batches
    for a, t, size in zip(alone, together, sizes):
        assert a.labels.shape == size
        np.testing.assert_array_equal(t.labels, a.labels)
        np.testing.assert_array_equal(t.class_areas, a.class_areas)
        np.testing.assert_allclose(t.confidence, a.confidence, rtol=0, atol=1e-6)
        np.testing.assert_allclose(t.class_scores, a.class_scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(t.grid_probs, a.grid_probs)
        assert t.score == pytest.approx(a.score, abs=1e-6)
    assert {tuple(np.unique(s.labels)) for s in alone} != {(seg_mod.NO_LABEL,)}  # something is labelled
    assert len({s.labels.tobytes() for s in alone}) == len(alone)  # and each image differently


def test_unknown_score_is_refused_by_engine_and_settings():
    assert SCORES == SETTINGS_SCORES
    with pytest.raises(ValueError, match="unknown score"):
        seg_mod.segment_in_batches(
            [], lambda h, w: (h, w), lambda b, s: torch.zeros(0), n_labels=1, batch_size=1, min_confidence=0.0,
            score="variance",
        )  # fmt: skip
    with pytest.raises(SettingsError, match="MASKCLIP_SCORE"):
        Settings.from_env({"MASKCLIP_SCORE": "variance"})
    assert Settings.from_env({"MASKCLIP_SCORE": "entropy"}).score == "entropy"


def test_segment_options_carry_the_score():
    from labelstudio_maskclip.models import segment_options

    assert segment_options(Settings(score="margin")).score == "margin"


def test_a_label_won_by_one_pixel_scores_that_pixels_probability():
    probs = torch.zeros(3, 1, 3)  # the grid's own size: no interpolation
    probs[:, 0, 0] = torch.tensor([0.7, 0.2, 0.1])
    probs[:, 0, 1] = torch.tensor([0.2, 0.6, 0.2])  # label 1 wins this one pixel only
    probs[:, 0, 2] = torch.tensor([0.8, 0.1, 0.1])
    seg = seg_mod._finalize(probs, (1, 3), 3, 0.0)
    assert seg.class_areas.tolist() == [2, 1, 0]
    assert seg.class_scores.tolist() == pytest.approx([0.75, 0.6, 0.0], abs=1e-6)


def test_an_image_with_no_labelled_pixel_scores_zero_for_every_kind():
    probs = _uniform_grid([0.5, 0.3, 0.2])
    for kind in SCORES:
        seg = seg_mod._finalize(probs, (4, 4), 3, 0.9, kind)  # nothing reaches min_confidence 0.9
        assert (seg.labels == seg_mod.NO_LABEL).all() and seg.score == 0.0, kind


def test_margin_with_two_labels_and_entropy_with_one():
    two = seg_mod._finalize(_uniform_grid([0.7, 0.3]), (3, 3), 2, 0.0, "margin")
    assert two.score == pytest.approx(0.4, abs=1e-6)
    one = seg_mod._finalize(_uniform_grid([1.0]), (3, 3), 1, 0.0, "entropy")
    assert one.score == 1.0 and (one.labels == 0).all()
    assert seg_mod._finalize(_uniform_grid([1.0]), (3, 3), 1, 0.0, "margin").score == 1.0


def test_entropy_of_two_labels_and_a_pixel_exactly_at_the_confidence_threshold():
    even = seg_mod._finalize(_uniform_grid([0.5, 0.5]), (3, 3), 2, 0.5, "entropy")
    assert (even.labels == 0).all()  # 0.5 is not below min_confidence 0.5: labelled (ties go to the first)
    assert even.score == pytest.approx(0.0, abs=1e-6)  # two equal labels: entropy log 2, normalised 1
    sure = seg_mod._finalize(_uniform_grid([0.75, 0.25]), (3, 3), 2, 0.0, "entropy")
    assert sure.score == pytest.approx(1 + (0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2), abs=1e-5)
