"""Which model a worker serves (serving/runtime.py), at the points mutation testing found unchecked
(docs/mutation.md): the teacher's version and when it is loaded, a promoted student loaded once per version,
a promoted checkpoint that cannot load, and what an unsaved student says."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from labelstudio_maskclip.engine.segmenter import MaskCLIP
from labelstudio_maskclip.models import pipeline_description
from labelstudio_maskclip.serving.runtime import Runtime
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training.student import LabelMismatchError, StudentError, StudentModel
from tests.test_learning_loop import BRUSH_CLASSES, _embeddings, _promote, constant_student
from tests.test_training import synthetic
from tests.tiny import TINY_VIT


def _settings(model_dir: Path, weights: Path) -> Settings:
    return Settings(model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=32, templates="simple",
                    model_dir=str(model_dir))  # fmt: skip


def test_the_teacher_version_names_the_architecture_and_the_weights_file(tmp_path, weights):
    s = _settings(tmp_path, weights)
    tail = pipeline_description(s)
    assert Runtime(s).teacher_version() == f"maskclip-MaskCLIP-Tiny-ViT.tiny_vit.pt-{tail}"
    assert Runtime(s.replace(pretrained="")).teacher_version() == f"maskclip-MaskCLIP-Tiny-ViT.random-{tail}"
    named = s.replace(model="ViT-B-16", pretrained="")  # an open_clip name, not a config file
    assert Runtime(named).teacher_version() == f"maskclip-ViT-B-16.random-{pipeline_description(named)}"


def test_without_a_student_the_teacher_is_served_and_loaded_only_when_asked(tmp_path, weights, caplog):
    rt = Runtime(_settings(tmp_path, weights))
    with caplog.at_level(logging.INFO, logger="labelstudio_maskclip"):
        assert rt.model_for(BRUSH_CLASSES, load=False) == (rt.teacher_version(), None)  # /setup: nothing loaded
        version, model = rt.model_for(BRUSH_CLASSES)
    assert version == rt.teacher_version() and isinstance(model, MaskCLIP)
    assert not [r for r in caplog.records if "student" in r.getMessage()]  # no student: nothing tried or said


def test_a_promoted_student_is_loaded_once_per_version(tmp_path, weights):
    rt = Runtime(_settings(tmp_path, weights))
    emb = _embeddings(3)
    first = _promote(tmp_path, constant_student(emb, 1), BRUSH_CLASSES)
    version, model = rt.model_for(BRUSH_CLASSES, load=False)
    assert version == first and isinstance(model, StudentModel) and model.version == first
    assert rt.model_for(BRUSH_CLASSES, load=False)[1] is model  # the same object: not read again
    second = _promote(tmp_path, constant_student(emb, 2), BRUSH_CLASSES)
    version, again = rt.model_for(BRUSH_CLASSES, load=False)
    assert version == second and again is not model and again.version == second


def test_a_promoted_checkpoint_that_cannot_load_serves_the_teacher(tmp_path, weights, caplog):
    rt = Runtime(_settings(tmp_path, weights))
    version = _promote(tmp_path, constant_student(_embeddings(3), 1), BRUSH_CLASSES)
    ck.checkpoint_path(tmp_path, version).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.ERROR, logger="labelstudio_maskclip"):
        assert rt.model_for(BRUSH_CLASSES, load=False) == (rt.teacher_version(), None)
    assert any(version in r.getMessage() and "rollback" in r.getMessage() for r in caplog.records)


def test_an_unsaved_student_says_so_and_a_wrong_class_count_is_named():
    emb = _embeddings(3)
    model = StudentModel(constant_student(emb, 0), BRUSH_CLASSES)
    assert model.version == "" and model.meta == {}
    with pytest.raises(LabelMismatchError, match=r"student \(unsaved\) was trained for labels"):
        model.segment([synthetic(1)[0]], [("Dog",), ("Food",), ("Sky",)])
    with pytest.raises(StudentError, match="student has 3 classes but 2 labels \\+ 0 background were given"):
        StudentModel(constant_student(emb, 0), BRUSH_CLASSES[:2])


def test_a_version_is_loaded_from_its_own_checkpoint_when_the_pointer_moved_on(tmp_path, weights):
    """Another instance may promote between this worker's read of the pointer and its load: the version it
    read is loaded from that version's file, so its answers and the version it names never disagree."""
    rt = Runtime(_settings(tmp_path, weights))
    emb = _embeddings(3)
    first = _promote(tmp_path, constant_student(emb, 1), BRUSH_CLASSES)
    second = _promote(tmp_path, constant_student(emb, 2), BRUSH_CLASSES)
    assert ck.current_version(tmp_path) == second
    model = rt._load_student(first)
    assert model is not None and model.version == first
    assert rt.model_for(BRUSH_CLASSES, load=False)[1].version == second  # the next request follows the pointer


def test_instances_sharing_a_model_dir_follow_each_others_promotions_and_rollbacks(tmp_path, weights, store_url):
    """Two runtimes (two instances, or two workers) over one MODEL_DIR and one store (SQLite, or PostgreSQL
    with its served-version pointer): what one promotes or rolls back, the other serves on its next call,
    without a restart; a student it had loaded is dropped."""
    s = _settings(tmp_path, weights).replace(store_url=store_url)
    here, there = Runtime(s), Runtime(s)
    teacher = here.teacher_version()
    assert here.model_for(BRUSH_CLASSES, load=False)[0] == there.model_for(BRUSH_CLASSES, load=False)[0] == teacher
    emb = _embeddings(3)
    first = _promote(s, constant_student(emb, 1), BRUSH_CLASSES)
    served = [rt.model_for(BRUSH_CLASSES, load=False) for rt in (here, there)]
    assert [(v, m.version) for v, m in served] == [(first, first)] * 2
    second = _promote(s, constant_student(emb, 2), BRUSH_CLASSES)
    assert [rt.model_for(BRUSH_CLASSES, load=False)[1].version for rt in (here, there)] == [second] * 2
    ck.rollback(s, first)
    assert [rt.model_for(BRUSH_CLASSES, load=False)[1].version for rt in (here, there)] == [first] * 2
    ck.rollback(s, "maskclip")
    assert [rt.model_for(BRUSH_CLASSES, load=False) for rt in (here, there)] == [(teacher, None)] * 2
