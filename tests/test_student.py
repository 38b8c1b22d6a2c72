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
    with pytest.raises(StudentError, match="MASKCLIP_STUDENT="):
        build_student("unet", _emb(), "none")
    with pytest.raises(StudentWeightsError, match="MASKCLIP_STUDENT_PRETRAINED=none"):
        build_student("tiny", _emb(), "imagenet")
    with pytest.raises(StudentWeightsError, match="not 'imagenet', 'none' or an existing file"):
        build_student("lraspp_mobilenet_v3_large", _emb(), str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.weight": torch.zeros(1)}, wrong)
    with pytest.raises(StudentWeightsError, match="does not fit"):
        build_student("lraspp_mobilenet_v3_large", _emb(), str(wrong))


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
