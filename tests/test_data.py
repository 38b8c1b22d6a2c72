"""Training data (training/data.py): what is read from the store, the image cache, people's label maps, the
train/validation split, targets and augmentation, each checked in process on small real images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from labelstudio_maskclip.learning.store import AnnotationWrite, Sample, Store, TaskRecord
from labelstudio_maskclip.training import data as td

IGNORE = td.IGNORE


def _sample(task_id: int, masks: dict, image: str | None = None) -> Sample:
    h, w = next(iter(masks.values())).shape if masks else (8, 8)
    return Sample(task_id, 1000 + task_id, None, image or f"img-{task_id}", h, w, masks)


class Images:
    """``load_image`` over a dict of arrays, counting its calls; a missing ref raises as a vanished file does."""

    def __init__(self, images: dict[str, np.ndarray]):
        self.images, self.calls = images, []

    def __call__(self, ref: str, task_id: int) -> np.ndarray:
        self.calls.append((ref, task_id))
        return self.images[ref]


# --- the store ---------------------------------------------------------------------------------------------


def test_the_store_gives_samples_unlabeled_tasks_with_an_image_and_its_counter(tmp_path):
    store = Store(tmp_path)
    store.put_tasks([TaskRecord(1, image="a"), TaskRecord(2, image="b"), TaskRecord(3), TaskRecord(4, image="d")])
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    store.put_annotation(AnnotationWrite(id=10, task=TaskRecord(1, image="a"), masks={"cat": mask}, height=4, width=6))
    samples, unlabeled, seq = td.read_store(store)
    assert [s.task_id for s in samples] == [1] and list(samples[0].masks) == ["cat"]
    assert [t.id for t in unlabeled] == [2, 4]  # task 3 has no image to train on
    assert seq == store.current_seq() > 0
    assert store.count_since_last_training() == 1
    td.mark_trained(store, seq, None, "maskclip+-4", {"miou": {"candidate": 0.5}})
    assert store.count_since_last_training() == 0
    (run,) = store.training_runs()
    assert (run["seq"], run["model_version"], run["metrics"]) == (seq, "maskclip+-4", {"miou": {"candidate": 0.5}})


def test_one_projects_samples_and_tasks_are_read_and_its_run_recorded_for_it_up_to_what_it_saw(tmp_path):
    """A project's training sees only its own samples and tasks; its run is recorded for that project and up
    to the change counter read before training: what arrived during the run counts for the next one."""
    store = Store(tmp_path)
    mask = np.ones((4, 6), bool)
    for task, project in ((1, 1), (2, 2)):
        store.put_annotation(
            AnnotationWrite(id=10 + task, task=TaskRecord(task, project, "img"), masks={"cat": mask}, height=4, width=6)
        )
    store.put_tasks([TaskRecord(3, 1, "a"), TaskRecord(4, 2, "b")])
    samples, unlabeled, seq = td.read_store(store, 2)
    assert [s.task_id for s in samples] == [2] and [t.id for t in unlabeled] == [4]
    late = TaskRecord(5, 2, "c")  # annotated while project 2 trains
    store.put_annotation(AnnotationWrite(id=15, task=late, masks={"cat": mask}, height=4, width=6))
    td.mark_trained(store, seq, 2, "maskclip+-1", {})
    (run,) = store.training_runs(2)
    assert (run["project"], run["seq"]) == (2, seq) and store.training_runs(1) == []
    assert store.count_since_last_training(2) == 1  # the late annotation
    assert store.count_since_last_training(1) == 1  # project 1 was not trained


def test_default_classes_are_every_label_of_the_masks_sorted():
    m = np.ones((2, 2), bool)
    samples = [_sample(1, {"dog": m, "cat": m}), _sample(2, {"cat": m, "Bird": m})]
    assert td.default_classes(samples) == [("Bird",), ("cat",), ("dog",)]
    assert td.default_classes([]) == []


def test_masks_are_found_by_their_label_value_or_else_by_each_name():
    classes = [("car", "automobile"), ("sky",)]
    assert td.label_index(classes, ["Car", "Sky"]) == {"Car": 0, "Sky": 1}
    assert td.label_index(classes) == {"car": 0, "automobile": 0, "sky": 1}
    with pytest.raises(ValueError, match="^1 label values for 2 classes: give one value per class$"):
        td.label_index(classes, ["Car"])


def test_the_validation_split_is_fixed_by_task_id():
    """The same tasks are held out in every run and every version: changing the split would let a
    student be validated on tasks an earlier one trained on."""
    assert [t for t in range(20) if td.is_validation(t, 0.5)] == [0, 1, 4, 5, 6, 7, 8, 12, 14, 15, 18, 19]
    assert [t for t in range(40) if td.is_validation(t, 0.1)] == [5, 7, 8, 12, 14, 31]
    assert td.is_validation(np.int64(5), 0.1) and td.is_validation(5.0, 0.1)  # ids as the store hands them


# --- the image cache and label maps --------------------------------------------------------------------------


def test_images_are_cached_once_downscaled_antialiased_to_the_short_side(tmp_path):
    stripes = np.zeros((120, 90, 3), np.uint8)
    stripes[:, ::3] = 255  # every third column white
    small = np.full((40, 50, 3), 7, np.uint8)
    load = Images({"big": stripes, "small": small})
    big = td._cached_image(tmp_path, "big", 1, load, 30)
    cached = np.load(big)
    assert cached.shape == (40, 30, 3) and cached.dtype == np.uint8  # short side 90 -> 30, in proportion
    assert abs(cached.mean() - 255 / 3) < 10  # averaged, not sampled from the black columns
    assert td._cached_image(tmp_path, "big", 1, load, 30) == big and load.calls == [("big", 1)]
    assert td._cached_image(tmp_path, "big", 1, load, 45) != big  # another size: another file
    assert np.load(td._cached_image(tmp_path, "big", 1, load, 45)).shape == (60, 45, 3)
    np.testing.assert_array_equal(np.load(td._cached_image(tmp_path, "small", 2, load, 40)), small)  # small enough
    assert not list(tmp_path.glob("*.tmp*"))


def test_rounding_keeps_the_exact_colour_of_a_flat_image():
    flat = np.full((100, 70, 3), (200, 17, 254), np.uint8)
    out = td._resize_image(flat, 35)
    assert out.shape == (50, 35, 3)
    assert (out == np.array([200, 17, 254], np.uint8)).all()
    odd = td._resize_image(np.full((9, 7, 3), 128, np.uint8), 3)
    assert odd.shape == (4, 3, 3)  # 9 * 3/7 = 3.86 rounds to 4


def test_black_and_white_stay_black_and_white_and_a_ramp_is_sampled_at_the_new_pixels_centres():
    flat = np.zeros((100, 70, 3), np.uint8)
    flat[..., 1] = 255
    np.testing.assert_array_equal(td._resize_image(flat, 35), np.broadcast_to([0, 255, 0], (50, 35, 3)))
    ramp = np.broadcast_to((2 * np.arange(100)).astype(np.uint8)[None, :, None], (60, 100, 3))  # value 2x at column x
    out = td._resize_image(ramp, 30)
    # halved: new column i covers old columns 2i and 2i + 1, its centre is at 2i + 0.5, where the ramp is 4i + 1
    np.testing.assert_array_equal(out, np.broadcast_to((4 * np.arange(50) + 1)[None, :, None], (30, 50, 3)))


def test_an_image_small_enough_is_cached_as_it_is_and_any_array_a_loader_gives_is_resized():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    assert td._resize_image(img, 40) is img  # short side exactly the size: not resampled
    mirrored = img[:, ::-1]  # a view with negative strides, as a flip gives
    readonly = img.copy()
    readonly.flags.writeable = False  # as a memory-mapped or decoded image may be
    for arr in (mirrored, readonly):
        expected = td._resize_image(np.ascontiguousarray(arr), 20)
        np.testing.assert_array_equal(td._resize_image(arr, 20), expected)


def test_a_label_map_holds_each_known_label_at_the_image_size():
    cat = np.zeros((4, 4), bool)
    cat[:2] = True
    dog = np.zeros((4, 4), bool)
    dog[1:3] = True  # overlaps cat on row 1: the label later in name order wins
    bird = np.ones((4, 4), bool)
    got = td._label_map({"dog": dog, "cat": cat, "bird": bird}, {"cat": 0, "dog": 1}, (4, 4))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, 0], [0, 1, 1, IGNORE])
    assert (td._label_map({"bird": bird}, {"cat": 0}, (3, 5)) == IGNORE).all()
    assert td._label_map({"bird": bird}, {"cat": 0}, (3, 5)).shape == (3, 5)
    assert td._label_map({}, {"cat": 0}, (2, 2)).dtype == np.uint8
    # masks at the original size, image cached smaller: nearest neighbour, no mixed labels
    half = td._label_map({"cat": cat, "dog": ~cat}, {"cat": 0, "dog": 1}, (2, 2))
    np.testing.assert_array_equal(half, [[0, 0], [1, 1]])
    assert half.dtype == np.uint8  # label maps are stored as 8-bit


def test_prepare_caches_writes_label_maps_splits_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    images = {f"img-{t}": rng.integers(0, 256, (100, 80, 3), np.uint8) for t in range(8)}
    load = Images(images)
    mask = np.zeros((100, 80), bool)
    mask[:50] = True
    samples = [_sample(6, {"cat": mask}, image="gone")]  # its image cannot be fetched: the others still are
    samples += [_sample(t, {"cat": mask, "dog": ~mask, "zebra": mask}) for t in range(5)]
    samples.append(_sample(5, {"zebra": mask}))  # only a label the run does not train: never held out
    unlabeled = [TaskRecord(7, image="img-7"), TaskRecord(8, image="gone too")]
    out = td.prepare(samples, unlabeled, {"cat": 0, "dog": 1}, cache_dir=tmp_path / "cache", run_dir=tmp_path / "run",
                     load_image=load, crop=20, val_fraction=0.5)  # fmt: skip
    held = [t for t in range(5) if td.is_validation(t, 0.5)]
    assert held == [0, 1, 4] and td.is_validation(5, 0.5)
    assert [it.task_id for it in out.val] == held
    assert [it.task_id for it in out.train] == [2, 3, 5, 7] and out.train[-1].labels is None
    assert np.load(out.train[-1].image).shape == (80, 64, 3)  # the unlabeled task's image, cached
    assert ("img-7", 7) in load.calls and ("gone", 6) in load.calls
    assert out.counts == {"annotated": 3, "unlabeled": 1, "validation": 3, "failed_images": 2,
                          "unknown_label_masks": 6}  # fmt: skip
    first = out.val[0]
    assert first.labels == tmp_path / "run" / "labels" / "0.npy"
    assert np.load(first.image).shape == (80, 64, 3)  # short side at most max(2 x crop, 64)
    labels = np.load(first.labels)
    assert labels.shape == (80, 64) and (labels[:40] == 0).all() and (labels[40:] == 1).all()
    assert (np.load(out.train[2].labels) == IGNORE).all()  # task 5: nothing known
    assert sorted(p.parent.name for p in tmp_path.rglob("*.npy")) == ["cache"] * 7 + ["labels"] * 6
    again = td.prepare(samples[1:2], [], {"cat": 0}, cache_dir=tmp_path / "cache", run_dir=tmp_path / "run2",
                       load_image=load, crop=40, val_fraction=0.0)  # fmt: skip
    assert np.load(again.train[0].image).shape == (100, 80, 3)  # 2 x 40 = 80: not downscaled


# --- targets and augmentation --------------------------------------------------------------------------------


def test_a_pseudo_label_at_exactly_the_threshold_is_kept():
    probs = torch.tensor([[0.5, 0.3], [0.5, 0.7]]).reshape(1, 2, 1, 2)  # pixel 0: a tie at 0.5; pixel 1: 0.7
    human = torch.full((1, 1, 2), IGNORE, dtype=torch.uint8)
    assert td.build_targets(probs, human, 0.5).tolist() == [[[0, 1]]]
    assert td.build_targets(probs, human, 0.51).tolist() == [[[IGNORE, 1]]]
    assert td.build_targets(probs, human, 0.5).dtype == torch.int64


def test_crops_cover_a_quarter_to_all_of_the_image_within_the_aspect_range():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(300):
        y0, x0, ch, cw = td._crop_params(60, 90, rng)
        assert 0 <= y0 and y0 + ch <= 60 and 0 <= x0 and x0 + cw <= 90 and ch > 0 and cw > 0
        areas.append(ch * cw / (60 * 90))
        ratios.append(cw / ch)
    assert 0.23 < min(areas) < 0.3 and 0.8 < max(areas) <= 1.0
    assert 0.74 < min(ratios) < 0.8 and 1.25 < max(ratios) < 1.35
    assert {td._crop_params(60, 90, np.random.default_rng(s))[0] for s in range(50)} != {0}  # positions vary
    assert {td._crop_params(60, 90, np.random.default_rng(s))[1] for s in range(50)} != {0}


def test_a_crop_may_span_the_whole_width_or_the_whole_height():
    rng = np.random.default_rng(0)
    crops = [td._crop_params(40, 40, rng) for _ in range(2000)]
    assert any(cw == 40 and ch < 40 for _, _, ch, cw in crops)
    assert any(ch == 40 and cw < 40 for _, _, ch, cw in crops)


def test_an_image_too_thin_for_any_crop_gets_its_centre_square():
    assert td._crop_params(3, 100, np.random.default_rng(0)) == (0, 48, 3, 3)
    assert td._crop_params(100, 3, np.random.default_rng(0)) == (48, 0, 3, 3)


def test_the_jitter_scales_brightness_contrast_and_saturation_by_its_drawn_factors():
    """A pixel of colour p in an image of mean m and grey g: b * ((p - m) * c + m) then (x - g') * s + g'."""
    x = torch.tensor([[0.2, 0.6], [0.5, 0.5], [0.1, 0.3]])[:, :, None]  # (3, 2, 1): two pixels
    b, c, s = 1 + np.random.default_rng(3).uniform(-td.JITTER, td.JITTER, 3)
    got = td._jitter(x.clone(), np.random.default_rng(3))
    y = x * b
    y = (y - y.mean()) * c + y.mean()
    grey = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
    torch.testing.assert_close(got, ((y - grey) * s + grey).clamp(0, 1))
    assert not torch.allclose(got, x)
    bright = td._jitter(torch.ones(3, 2, 2), np.random.default_rng(0))
    assert bright.max() <= 1.0 and bright.min() >= 0.0
    dark = td._jitter(torch.zeros(3, 2, 2) - 0.5, np.random.default_rng(0))
    assert dark.min() == 0.0


def test_the_jitter_factors_stay_within_a_fifth():
    rng = np.random.default_rng(0)
    grey = torch.full((3, 4, 4), 0.5)
    seen = [td._jitter(grey, rng)[0, 0, 0].item() / 0.5 for _ in range(400)]  # a flat grey: only brightness acts
    assert 0.8 <= min(seen) < 0.82 and 1.18 < max(seen) <= 1.2


def _stripes(tmp_path, labelled: bool = True) -> td.Item:
    """A 40 x 60 image, left third red (label 0), the rest blue (label 1)."""
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    lab = np.ones((40, 60), np.uint8)
    lab[:, :20] = 0
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "lab.npy", lab)
    return td.Item(1, tmp_path / "img.npy", (tmp_path / "lab.npy") if labelled else None)


def test_augmented_crops_flip_image_and_labels_together_about_half_the_time(tmp_path):
    item = _stripes(tmp_path)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(60):
        x, y = td._augment(item, 16, rng)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.shape == (16, 16) and y.dtype == torch.uint8
        assert 0.0 <= x.min() and x.max() <= 1.0
        red = (x[0] > x[2]).to(torch.uint8)
        assert ((red == (y == 0)).float().mean()) > 0.9
        left, right = (y[:, :4] == 0).float().mean(), (y[:, -4:] == 0).float().mean()
        flipped += int(right > left)
    assert 18 < flipped < 42  # red (label 0) on the right: flipped


def test_an_unlabelled_crop_has_no_label_anywhere(tmp_path):
    x, y = td._augment(_stripes(tmp_path, labelled=False), 8, np.random.default_rng(0))
    assert x.shape == (3, 8, 8) and y.dtype == torch.uint8 and (y == IGNORE).all()


def test_a_batch_draws_n_random_items(tmp_path):
    item = _stripes(tmp_path)
    blank = td.Item(2, item.image, None)
    x, y = td.batch([item, blank], 12, 8, np.random.default_rng(1))
    assert x.shape == (12, 3, 8, 8) and y.shape == (12, 8, 8)
    unlabelled = [bool((y[i] == IGNORE).all()) for i in range(12)]
    assert 0 < sum(unlabelled) < 12  # both items drawn


def test_a_crop_is_the_image_in_0_1_before_the_jitter(tmp_path):
    """A flat image stays flat through crop, resize and flip: what comes out is the jitter of value / 255,
    with the jitter's factors drawn after the crop's and the flip's."""
    np.save(tmp_path / "flat.npy", np.full((30, 50, 3), 200, np.uint8))
    item = td.Item(1, tmp_path / "flat.npy")
    for seed in range(5):
        rng = np.random.default_rng(seed)
        twin = copy.deepcopy(rng)
        x, _ = td._augment(item, 16, rng)
        td._crop_params(30, 50, twin)
        twin.random()
        torch.testing.assert_close(x, td._jitter(torch.full((3, 16, 16), 200 / 255), twin))


def test_a_downscaled_crop_is_antialiased(tmp_path):
    """Alternate black and white columns, every crop scaled down 1.5 to 3 times: averaged, a flat grey; sampled
    without antialiasing, stripes of every shade."""
    img = np.zeros((96, 96, 3), np.uint8)
    img[:, ::2] = 255
    np.save(tmp_path / "stripes.npy", img)
    item = td.Item(1, tmp_path / "stripes.npy")
    rng = np.random.default_rng(0)
    for _ in range(10):
        x, _ = td._augment(item, 32, rng)
        assert x[:, 2:-2, 2:-2].std() < 0.05, float(x.std())


def test_masks_given_as_0_1_integers_are_read_as_masks():
    cat = np.zeros((3, 3), np.uint8)
    cat[0] = 1
    np.testing.assert_array_equal(td._label_map({"cat": cat}, {"cat": 0}, (3, 3))[:, 0], [0, IGNORE, IGNORE])


def test_prepare_makes_its_folders_and_runs_again_into_the_same_run(tmp_path):
    """A resumed run prepares into its own run folder again; the cache may live in folders not made yet."""
    images = Images({"img-1": np.zeros((100, 100, 3), np.uint8), "img-2": np.zeros((100, 100, 3), np.uint8)})
    mask = np.ones((100, 100), bool)
    samples = [_sample(1, {"cat": mask})]
    kw = dict(cache_dir=tmp_path / "not" / "yet" / "cache", run_dir=tmp_path / "runs" / "r1", load_image=images,
              crop=40, val_fraction=0.0)  # fmt: skip
    first = td.prepare(samples, [TaskRecord(2, image="img-2")], {"cat": 0}, **kw)
    again = td.prepare(samples, [TaskRecord(2, image="img-2")], {"cat": 0}, **kw)
    assert [it.task_id for it in again.train] == [it.task_id for it in first.train] == [1, 2]
    assert np.load(first.train[0].image).shape == (80, 80, 3)  # short side 100 > 2 x crop: cached at 80
    assert again.train[1].image == first.train[1].image and np.load(again.train[1].image).shape == (80, 80, 3)
    assert images.calls == [("img-1", 1), ("img-2", 2)]  # each image fetched once, with its task's id
