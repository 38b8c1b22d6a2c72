"""The MaskCLIP+ student (architecture, weights, serving) and the checkpoint registry."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip import NO_LABEL, Segmentation, SegmentOptions
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training.student import (
    LabelMismatchError,
    StudentError,
    StudentNet,
    StudentWeightsError,
    build_student,
    load_student,
)


def _emb(c: int = 3, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _payload(net, classes, background=()) -> dict:
    return {
        "student": net.name,
        "state_dict": net.state_dict(),
        "embeddings": F.normalize(net.classifier.weight.detach()[:, :, 0, 0], dim=1),
        "classes": [list(c) if not isinstance(c, str) else [c] for c in classes],
        "background": [[b] for b in background],
        "clip": {"model": "tiny", "pretrained": "random", "templates": ["{}"]},
        "settings": {"student": net.name},
        "metrics": {"miou": {"candidate": 0.5}},
        "data": {"annotated": 1},
    }


# --- architecture ----------------------------------------------------------------------------------


def test_deeplab_student_has_output_stride_8_and_a_frozen_text_classifier():
    emb = _emb(4, 32)
    net = build_student("deeplabv3_resnet50", emb, "none").eval()
    assert net.stride == 8
    bb = net.trunk.backbone  # replace_stride_with_dilation=[False, True, True]
    assert bb.layer3[0].conv2.stride == (1, 1) and bb.layer4[0].conv2.stride == (1, 1)
    assert bb.layer3[1].conv2.dilation == (2, 2) and bb.layer4[1].conv2.dilation == (4, 4)
    torch.testing.assert_close(net.classifier.weight[:, :, 0, 0], emb)
    assert not net.classifier.weight.requires_grad
    with torch.no_grad():
        logits = net(torch.randn(1, 3, 64, 80))
    assert logits.shape == (1, 4, 8, 10)
    scale = net.log_scale.exp()
    assert logits.abs().max() <= scale + 1e-4  # scale * cosine


def test_logits_are_scaled_cosines_of_normalised_features():
    emb = _emb(3, 16)
    net = build_student("tiny", emb, "none").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(net.trunk(x), dim=1)
        expected = net.log_scale.exp() * torch.einsum("bdhw,kd->bkhw", feats, emb)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    assert net(x).shape == (2, 3, 8, 8)


def test_lraspp_student_loads_a_local_backbone_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(1)
    path = tmp_path / "mnv3.pth"
    reference = mobilenet_v3_large(weights=None)
    torch.save(reference.state_dict(), path)
    net = build_student("lraspp_mobilenet_v3_large", _emb(2, 16), str(path))
    torch.testing.assert_close(net.trunk.backbone["0"][0].weight, reference.features[0][0].weight)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 8, 8)


def test_bad_names_and_weights_say_what_to_set(tmp_path):
    with pytest.raises(StudentError) as err:
        build_student("unet", _emb(), "none")
    assert str(err.value) == (
        "MASKCLIP_STUDENT='unet': choose one of deeplabv3_resnet50, deeplabv3_resnet101, lraspp_mobilenet_v3_large, tiny"
    )
    with pytest.raises(StudentWeightsError) as err:
        build_student("tiny", _emb(), " imagenet")
    assert str(err.value) == (
        "the tiny student has no pretrained weights (MASKCLIP_STUDENT_PRETRAINED='imagenet'): "
        "set MASKCLIP_STUDENT_PRETRAINED=none"
    )
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(StudentWeightsError) as err:
        build_student("lraspp_mobilenet_v3_large", _emb(), missing)
    assert str(err.value) == (
        f"MASKCLIP_STUDENT_PRETRAINED={missing!r} is not 'imagenet', 'none' or an existing file "
        "with torchvision backbone weights for lraspp_mobilenet_v3_large."
    )
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.weight": torch.zeros(1)}, wrong)
    with pytest.raises(StudentWeightsError, match="does not fit"):
        build_student("lraspp_mobilenet_v3_large", _emb(), str(wrong))


def test_the_tiny_students_weights_keep_their_names_and_shapes():
    """A checkpoint of the tiny student saved by an earlier version loads in this one: the same parameters,
    and the same geometry (3 x 3 convolutions without bias before each batch norm, strides 2, 2, 1, 1 with
    dilations 1, 1, 2, 4 padded to keep the size: output stride 4, context 55 pixels)."""
    net = build_student("tiny", _emb(3, 16))  # no pretrained weights unless asked
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    bn = {f"trunk.body.{i}.{p}": (c,) for i, c in ((1, 16), (4, 32), (7, 32), (10, 32))
          for p in ("weight", "bias", "running_mean", "running_var")}  # fmt: skip
    bn |= {f"trunk.body.{i}.num_batches_tracked": () for i in (1, 4, 7, 10)}
    assert shapes == {
        "log_scale": (),
        "trunk.body.0.weight": (16, 3, 3, 3),
        "trunk.body.3.weight": (32, 16, 3, 3),
        "trunk.body.6.weight": (32, 32, 3, 3),
        "trunk.body.9.weight": (32, 32, 3, 3),
        "trunk.proj.weight": (16, 32, 1, 1),
        "trunk.proj.bias": (16,),
        "classifier.weight": (3, 16, 1, 1),
        **bn,
    }
    convs = [m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    geometry = [(c.stride[0], c.dilation[0], c.padding[0]) for c in convs]
    assert geometry == [(2, 1, 1), (2, 1, 1), (1, 2, 2), (1, 4, 4), (1, 1, 0)]
    assert all(c.stride[0] == c.stride[1] and c.dilation[0] == c.dilation[1] for c in convs)
    assert not net.classifier.weight.requires_grad and net.stride == 4
    assert StudentNet("tiny", _emb(3, 16)).state_dict().keys() == net.state_dict().keys()


def test_the_output_grid_is_the_input_divided_by_the_stride():
    """``stride`` is what the server sizes images by (a multiple of it): it must be the network's own."""
    x = torch.randn(1, 3, 64, 96)
    for name, pretrained in (("tiny", ""), ("tiny", " none "), ("lraspp_mobilenet_v3_large", "none")):
        net = build_student(name, _emb(2, 16), pretrained).eval()
        with torch.no_grad():
            out = net(x)
        assert out.shape == (1, 2, 64 // net.stride, 96 // net.stride) and net.stride == (4 if name == "tiny" else 8)


def test_a_new_student_starts_at_ten_times_the_cosine_and_the_scale_stops_at_a_hundred():
    emb = _emb(3, 16) * 3.0  # the classifier holds the text embeddings normalised, whatever they were given as
    net = build_student("tiny", emb, "none").eval()
    torch.testing.assert_close(net.classifier.weight[:, :, 0, 0], F.normalize(emb, dim=1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(net.trunk(x), dim=1)
        cos = torch.einsum("bdhw,kd->bkhw", feats, F.normalize(emb, dim=1))
        torch.testing.assert_close(net(x), 10.0 * cos, rtol=1e-5, atol=1e-5)
        net.log_scale.fill_(float(np.log(1000.0)))
        torch.testing.assert_close(net(x), 100.0 * cos, rtol=1e-5, atol=1e-5)


def _mobilenet_state(seed: int) -> dict:
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(seed)
    return mobilenet_v3_large(weights=None).state_dict()


def test_imagenet_weights_come_from_torchvisions_cache_and_a_failure_says_how_to_do_without(tmp_path, monkeypatch):
    """``imagenet`` loads torchvision's ImageNet classification weights of the student's backbone (from its
    cache, here filled by hand: no download); ``none`` never does; a download or cache that fails says what to
    set instead."""
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights

    from labelstudio_maskclip.training.student import _imagenet_weights

    assert _imagenet_weights("deeplabv3_resnet50") is ResNet50_Weights.IMAGENET1K_V1
    assert _imagenet_weights("deeplabv3_resnet101") is ResNet101_Weights.IMAGENET1K_V1
    assert _imagenet_weights("lraspp_mobilenet_v3_large") is MobileNet_V3_Large_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / MobileNet_V3_Large_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    reference = _mobilenet_state(3)
    torch.save(reference, cached)
    net = build_student("lraspp_mobilenet_v3_large", _emb(2, 16), "imagenet")
    torch.testing.assert_close(net.trunk.backbone["0"][0].weight, reference["features.0.0.weight"])
    random = build_student("lraspp_mobilenet_v3_large", _emb(2, 16), "none")
    assert not torch.allclose(random.trunk.backbone["0"][0].weight, reference["features.0.0.weight"])
    cached.write_bytes(b"a download cut short")
    with pytest.raises(StudentWeightsError) as err:
        build_student("lraspp_mobilenet_v3_large", _emb(2, 16), "imagenet")
    message = str(err.value)
    assert message.startswith("could not get ImageNet weights for the lraspp_mobilenet_v3_large student: ")
    assert message.endswith(
        ". Without internet, download the torchvision backbone weights on another machine and set "
        "MASKCLIP_STUDENT_PRETRAINED=/path/to/file.pth (or MASKCLIP_STUDENT_PRETRAINED=none to start from random "
        "weights)."
    )


class _Pickled:
    """Not a tensor: a weights file holding it must be refused, never unpickled."""

    def __init__(self):
        self.weights = {"0.0.weight": torch.zeros(1)}


def test_backbone_files_of_the_usual_layouts_load_and_others_say_why_not(tmp_path):
    """A classification model's state dict, saved bare, under ``state_dict``, from ``DataParallel``
    (``module.``) or from a segmentation model (``backbone.``), loads into the backbone; a file that is not a
    plain state dict of it is refused with a message naming the file."""
    reference = _mobilenet_state(4)
    trunk_keys = list(build_student("lraspp_mobilenet_v3_large", _emb(), "none").trunk.backbone.state_dict())
    backbone = {k: reference[f"features.{k}"] for k in trunk_keys}
    layouts = {
        "wrapped": {"state_dict": {f"module.{k}": v for k, v in reference.items()}},
        "segmentation": {f"backbone.{k}": v for k, v in backbone.items()},
    }
    for name, state in layouts.items():
        torch.save(state, tmp_path / f"{name}.pth")
        net = build_student("lraspp_mobilenet_v3_large", _emb(), str(tmp_path / f"{name}.pth"))
        torch.testing.assert_close(net.trunk.backbone["16"][0].weight, reference["features.16.0.weight"])
    path = str(tmp_path / "tensor.pth")
    torch.save(torch.zeros(3), path)
    with pytest.raises(StudentWeightsError) as err:
        build_student("lraspp_mobilenet_v3_large", _emb(), path)
    assert str(err.value) == (
        f"MASKCLIP_STUDENT_PRETRAINED={path!r} holds a Tensor, not a state dict of lraspp_mobilenet_v3_large "
        "backbone weights"
    )
    path = str(tmp_path / "pickled.pth")
    torch.save(_Pickled(), path)
    with pytest.raises(StudentWeightsError, match=f"^MASKCLIP_STUDENT_PRETRAINED={path!r}: cannot read it as a"):
        build_student("lraspp_mobilenet_v3_large", _emb(), path)
    path = str(tmp_path / "half.pth")
    torch.save({f"module.{k}": v for k, v in list(backbone.items())[5:]}, path)
    with pytest.raises(StudentWeightsError) as err:
        build_student("lraspp_mobilenet_v3_large", _emb(), path)
    assert str(err.value) == (
        f"MASKCLIP_STUDENT_PRETRAINED={path!r} does not fit the lraspp_mobilenet_v3_large backbone: 5 weights "
        f"missing (e.g. {trunk_keys[:3]}). Use torchvision's ImageNet classification weights for it."
    )


# --- serving ---------------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    net = build_student("tiny", _emb(3, 16), "none")
    version = ck.promote(tmp_path, _payload(net, ["cat", ("car", "automobile")], ["sky"]))
    return tmp_path, version, net


def test_load_student_segments_like_the_engine(saved):
    model_dir, version, net = saved
    model = load_student(ck.checkpoint_path(model_dir, version), "cpu")
    assert model.version == version and model.labels == ["cat", "car"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (33, 20, 3), dtype=np.uint8)]
    out = model.segment(images, ["cat", ("car", "automobile")], ["sky"], SegmentOptions(short_side=32))
    for img, r in zip(images, out):
        assert isinstance(r, Segmentation)
        assert r.labels.shape == img.shape[:2] and r.grid_probs.shape[0] == 3
        assert set(np.unique(r.labels)) <= {0, 1, NO_LABEL}
        np.testing.assert_array_equal(r.labels == NO_LABEL, r.probabilities().argmax(0) == 2)  # sky -> no label
    # same weights as the net that was saved
    torch.testing.assert_close(model.net.state_dict()["trunk.proj.weight"], net.state_dict()["trunk.proj.weight"])


def test_request_order_is_followed_and_other_labels_refused(saved):
    model_dir, version, _ = saved
    model = load_student(ck.checkpoint_path(model_dir, version), "cpu")
    img = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    opts = SegmentOptions(short_side=32)
    a = model.segment([img], ["cat", ("car", "automobile")], ["sky"], opts)[0]
    b = model.segment([img], [("car", "automobile"), "cat"], ["sky"], opts)[0]
    np.testing.assert_array_equal(np.where(a.labels >= 0, 1 - a.labels, a.labels), b.labels)
    assert model.serves([("car", "automobile"), "cat"], ["sky"])
    assert not model.serves(["cat", "car"], ["sky"])  # synonyms are part of the class
    with pytest.raises(LabelMismatchError, match="trained for labels"):
        model.segment([img], ["dog", "cat"], ["sky"], opts)


def test_min_confidence_applies_to_the_student(saved):
    model_dir, version, _ = saved
    model = load_student(ck.checkpoint_path(model_dir, version), "cpu")
    img = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    r = model.segment([img], opts=SegmentOptions(short_side=32, min_confidence=0.99))[0]
    assert (r.labels[r.confidence < 0.99] == NO_LABEL).all()


def test_a_loaded_student_keeps_the_checkpoints_metadata_and_serves_its_labels_with_their_background(saved):
    model_dir, version, _ = saved
    model = load_student(ck.checkpoint_path(model_dir, version), "cpu")
    assert model.classes == (("cat",), ("car", "automobile")) and model.background == (("sky",),)
    assert set(model.meta) == {"student", "classes", "background", "clip", "settings", "metrics", "data", "format",
                               "version", "created"}  # fmt: skip
    assert model.meta["version"] == version and model.meta["metrics"] == {"miou": {"candidate": 0.5}}
    assert model.serves([("car", "automobile"), "cat"], ["sky"])
    assert not model.serves([("car", "automobile"), "cat"])  # the same labels, another background
    assert not model.serves([("car", "automobile"), "cat"], ["sky", "road"])
    assert not model.serves(["cat"], ["sky"])
    img = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with pytest.raises(LabelMismatchError, match=r"\(background \['sky'\]\), not \['cat', 'car'\]"):
        model.segment([img], ["cat", ("car", "automobile")], [], SegmentOptions(short_side=32))


def test_a_checkpoint_without_background_or_version_loads_as_an_unsaved_student_without_background(tmp_path):
    """A checkpoint of ours written outside the registry (no version) and before background classes existed."""
    torch.manual_seed(0)
    net = build_student("tiny", _emb(2, 16), "none")
    payload = _payload(net, ["cat", "dog"])
    del payload["background"]
    path = ck.save_checkpoint(tmp_path / "student.pt", {**payload, "format": ck.FORMAT})
    model = load_student(path, "cpu")
    assert model.version == "" and model.background == () and model.labels == ["cat", "dog"]
    img = np.random.default_rng(4).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    (out,) = model.segment([img], opts=SegmentOptions(short_side=32))
    assert out.grid_probs.shape[0] == 2 and set(np.unique(out.labels)) <= {0, 1}


def test_background_channels_follow_the_requests_order_too(tmp_path):
    """Each of the request's classes and background classes gets the student's channel for it."""
    torch.manual_seed(0)
    net = build_student("tiny", _emb(4, 16), "none")
    version = ck.promote(tmp_path, _payload(net, ["cat", "dog"], ["sky", "road"]))
    model = load_student(ck.checkpoint_path(tmp_path, version), "cpu")
    img = np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    opts = SegmentOptions(short_side=32)
    a = model.segment([img], ["cat", "dog"], ["sky", "road"], opts)[0]
    b = model.segment([img], ["dog", "cat"], ["road", "sky"], opts)[0]
    np.testing.assert_allclose(a.grid_probs[[1, 0, 3, 2]], b.grid_probs, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a.grid_probs, b.grid_probs)


# --- registry --------------------------------------------------------------------------------------


def test_registry_versions_pointer_history_and_rollback(tmp_path):
    assert ck.current_version(tmp_path) is None and ck.current_checkpoint(tmp_path) is None
    net = build_student("tiny", _emb(2, 8), "none")
    v1 = ck.promote(tmp_path, _payload(net, ["a", "b"]))
    v2 = ck.promote(tmp_path, _payload(net, ["a", "b"]))
    assert (v1, v2) == ("maskclip+-1", "maskclip+-2") and ck.current_version(tmp_path) == v2
    hist = ck.history(tmp_path)
    assert [h["version"] for h in hist] == [v1, v2] and [h["current"] for h in hist] == [False, True]
    assert hist[0]["classes"] == [["a"], ["b"]] and hist[0]["metrics"]["miou"]["candidate"] == 0.5
    assert "created" in hist[0] and "state_dict" not in hist[0]
    ckpt = ck.read_checkpoint(ck.checkpoint_path(tmp_path, v1))
    assert ckpt["format"] == ck.FORMAT and ckpt["version"] == v1 and ckpt["clip"]["model"] == "tiny"
    assert ck.rollback(tmp_path, v1) == v1 and ck.current_version(tmp_path) == v1
    with pytest.raises(ck.CheckpointError, match="known: maskclip\\+-1, maskclip\\+-2"):
        ck.rollback(tmp_path, "maskclip+-9")
    assert ck.rollback(tmp_path, "maskclip") == "maskclip" and ck.current_version(tmp_path) is None
    leftovers = [p.name for p in ck.models_dir(tmp_path).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    ck.write_atomic(target, b"old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck.write_atomic(target, boom)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_read_checkpoint_refuses_other_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.read_checkpoint(tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ck.CheckpointError, match="not a labelstudio-maskclip student checkpoint"):
        ck.read_checkpoint(other)


def test_serving_side_does_not_import_training():
    """The student's serving side loads no training code; of learning/, only the store (the served-version
    pointer lives there with a PostgreSQL store; the server opens the store for webhooks anyway)."""
    import subprocess
    import sys

    code = (
        "import sys, labelstudio_maskclip.training.student, labelstudio_maskclip.training.checkpoints; "
        "bad = [m for m in sys.modules if m.startswith(('labelstudio_maskclip.training.', 'labelstudio_maskclip.learning.')) "
        "and m.rsplit('.', 1)[1] not in ('student', 'checkpoints', 'job', 'store', 'backends', 'migrations')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
