"""One source per concept: the label-spec syntax, the class-name normaliser, the dense modes and the
storage URI prefixes, each defined once and used by every caller."""

from __future__ import annotations

import argparse

import pytest

from labelstudio_maskclip import cli
from labelstudio_maskclip.engine.modes import DENSE_MODES
from labelstudio_maskclip.engine.names import format_label_spec, normalize_classes, normalize_names, parse_label_spec
from labelstudio_maskclip.fetching import images
from labelstudio_maskclip.fetching.uris import CLOUD_SCHEMES, IMAGE_URI_PREFIXES
from labelstudio_maskclip.labelstudio.labeling import parse_label_config
from labelstudio_maskclip.labelstudio.webhooks import image_reference
from labelstudio_maskclip.settings import Settings, SettingsError


@pytest.mark.parametrize(
    "spec,classes",
    [
        ("car|automobile,dog", (("car", "automobile"), ("dog",))),
        (" car | automobile ,  dog ", (("car", "automobile"), ("dog",))),  # space around names is ignored
        ("dining table,tv monitor", (("dining table",), ("tv monitor",))),  # inner spaces are kept
        ("a,,b,", (("a",), ("b",))),  # empty classes are dropped
        ("a| |b,|", (("a", "b"),)),  # empty synonyms too; a class of empty names is no class
        ("car|car|auto", (("car", "auto"),)),  # a repeated synonym counts once
        ("\tcat\n", (("cat",),)),
        ("", ()),
        (None, ()),
        ("a\\,b|c\\|d,e\\\\f", (("a,b", "c|d"), ("e\\f",))),  # backslash escapes , | and itself
    ],
)
def test_label_spec_syntax(spec, classes):
    assert parse_label_spec(spec) == classes


@pytest.mark.parametrize(
    "classes",
    [
        ["dog"],
        [("car", "automobile"), "dog"],
        [("Person, adult", "a|b"), "back\\slash", "tv monitor"],
    ],
)
def test_formatted_spec_parses_back_to_the_same_classes(classes):
    spec = format_label_spec(classes)
    assert parse_label_spec(spec) == normalize_classes(classes)


def test_plain_names_format_without_escapes():
    assert format_label_spec([("car", " automobile"), "dog"]) == "car|automobile,dog"


def test_name_normaliser():
    assert normalize_names([" car", "automobile ", "", "  ", "car"]) == ("car", "automobile")
    assert normalize_classes(["cat", (" car ", "automobile", "car")]) == (("cat",), ("car", "automobile"))
    with pytest.raises(ValueError, match="no usable name"):
        normalize_classes(["cat", ("", " ")])
    with pytest.raises(ValueError, match="no class names"):
        normalize_classes([])


def test_label_config_synonyms_use_the_same_normaliser():
    xml = """<View><Image name="img" value="$image"/>
      <BrushLabels name="tag" toName="img">
        <Label value="Car" predicted_values=" car , automobile,car,"/><Label value="Dog"/>
      </BrushLabels></View>"""
    (target,) = parse_label_config(xml).targets
    assert [(label.value, label.names) for label in target.labels] == [
        ("Car", ("car", "automobile")),
        ("Dog", ("Dog",)),
    ]


def test_cli_train_detach_passes_parsed_classes(monkeypatch, tmp_path):
    seen = {}

    def fake_request(settings, reason, *, classes=None, background=(), project=None):
        seen.update(classes=classes, background=background, project=project)
        return True

    monkeypatch.setattr("labelstudio_maskclip.training.trigger.request_training", fake_request)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert cli.main(["train", "--detach", "--labels", " car | automobile, dog ", "--project", "4"]) == 0
    assert seen == {"classes": (("car", "automobile"), ("dog",)), "background": (), "project": 4}


def test_dense_modes_have_one_list():
    for mode in DENSE_MODES:
        assert Settings(dense_mode=mode).validated().dense_mode == mode
    with pytest.raises(SettingsError, match="choose one of maskclip, sclip, clearclip, naclip"):
        Settings(dense_mode="segformer").validated()
    (segment,) = [a for a in cli.build_parser()._subparsers._actions if isinstance(a, argparse._SubParsersAction)]
    choices = {a.dest: a.choices for a in segment.choices["segment"]._actions}
    assert tuple(choices["dense_mode"]) == DENSE_MODES


def test_every_cloud_scheme_is_an_image_reference_and_fetchable():
    assert set(CLOUD_SCHEMES) == {"s3", "gs", "gcs", "azure-blob"}
    for scheme in CLOUD_SCHEMES:
        uri = f"{scheme}://bucket/key"  # no image suffix: recognised by the prefix alone
        assert uri.startswith(IMAGE_URI_PREFIXES)
        assert image_reference({"caption": "a cat", "photo": uri}) == uri
    assert image_reference({"photo": "gcs://bucket/k"}) == "gcs://bucket/k"
    assert image_reference({"photo": "ftp://host/k"}) is None
    assert image_reference({"photo": "/data/upload/3/x"}) == "/data/upload/3/x"
    assert image_reference({"photo": "data:image/png;base64,AAAA"}) == "data:image/png;base64,AAAA"
    assert images.CLOUD_SCHEMES is CLOUD_SCHEMES  # the fetcher presigns the same list (tests/test_images.py)
