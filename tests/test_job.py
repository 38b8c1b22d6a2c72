"""A training job's labels on the trainer's command line: ``--classes-json`` written by the server's trigger and
read back by the trainer process (training/job.py)."""

from __future__ import annotations

import json

import pytest

from labelstudio_maskclip.training.job import TrainJob, class_key, classes_from_json, classes_json


def test_classes_and_their_label_values_survive_the_command_line():
    text = classes_json([("car", "automobile"), "Sky, clear", ("road|street",)], ["Car", "Sky, clear", "Road"])
    assert json.loads(text) == [
        {"names": ["car", "automobile"], "value": "Car"},
        {"names": ["Sky, clear"], "value": "Sky, clear"},
        {"names": ["road|street"], "value": "Road"},
    ]
    assert classes_from_json(text) == (
        (("car", "automobile"), ("Sky, clear",), ("road|street",)),
        ("Car", "Sky, clear", "Road"),
    )


def test_without_values_the_trainer_matches_masks_by_the_names():
    text = classes_json(["cat", ("dog", "puppy")])
    assert json.loads(text) == [{"names": ["cat"]}, {"names": ["dog", "puppy"]}]
    assert classes_from_json(text) == ((("cat",), ("dog", "puppy")), None)
    # one class without a value: the values are not trusted for any class
    partial = json.dumps([{"names": ["cat"], "value": "Cat"}, {"names": ["dog"]}])
    assert classes_from_json(partial) == ((("cat",), ("dog",)), None)
    assert classes_from_json(json.dumps([{"names": ["cat"], "value": 3}])) == ((("cat",),), None)


def test_names_are_normalised_the_engines_way():
    assert class_key(["  cat ", ("car", " automobile")]) == (("cat",), ("car", "automobile"))
    assert class_key([]) == () and class_key(()) == ()
    with pytest.raises(ValueError, match="no usable name"):
        class_key(["cat", "  "])
    assert json.loads(classes_json([" cat "])) == [{"names": ["cat"]}]


@pytest.mark.parametrize(
    "text",
    [
        "{}",  # not a list
        "[]",  # no class
        '["cat"]',  # a class that is not an object
        '[{"value": "Cat"}]',  # no names
        '[{"names": []}]',  # empty names
        '[{"names": ["cat"]}, {"names": [3]}]',  # a name that is not text
        '[{"names": ["cat"]}, "dog"]',  # one entry of the wrong kind among good ones
    ],
)
def test_anything_else_is_refused_with_the_flag_named(text):
    with pytest.raises(ValueError, match=r"^--classes-json: expected a non-empty list of \{'names'") as err:
        classes_from_json(text)
    assert str(err.value).endswith(": " + text)  # the text given, to find it


def test_a_job_defaults_to_every_label_of_every_project_from_scratch():
    job = TrainJob()
    assert (job.classes, job.values, job.background, job.project, job.resume, job.progress) == (
        None,
        None,
        (),
        None,
        None,
        True,
    )
