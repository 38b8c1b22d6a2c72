import dataclasses

import pytest

from labelstudio_maskclip.labelstudio import labeling
from labelstudio_maskclip.labelstudio.labeling import (
    LabelConfigError,
    LabelingSpec,
    LabelSpec,
    Target,
    parse_label_config,
)

BRUSH = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog"/>
  </BrushLabels>
</View>
"""

POLYGON = """
<View>
  <Image name="img" value="$photo"/>
  <PolygonLabels name="poly" toName="img" strokeWidth="3">
    <Label value="Car" predicted_values="car, automobile,van"/>
    <Label value="Person"/>
  </PolygonLabels>
</View>
"""

BOTH = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image">
    <Label value="cat"/>
    <Label value="sky"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat" predicted_values="cat,kitten"/>
    <Label value="car"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="box-only"/></RectangleLabels>
  <Labels name="ner" toName="image"><Label value="ignored"/></Labels>
  <Choices name="ok" toName="image"><Choice value="yes"/></Choices>
</View>
"""


def test_brush_only():
    spec = parse_label_config(BRUSH)
    assert spec == LabelingSpec(
        (Target("tag", "image", "brush", "image", (LabelSpec("cat", ("cat",)), LabelSpec("dog", ("dog",)))),)
    )
    assert spec.vocabulary == ("cat", "dog")
    assert spec.image_keys == ("image",)
    assert spec.targets[0].result_type == "brushlabels"


def test_polygon_only_with_synonyms():
    (target,) = parse_label_config(POLYGON).targets
    assert (target.from_name, target.to_name, target.kind, target.image_key) == ("poly", "img", "polygon", "photo")
    assert target.result_type == "polygonlabels"
    assert target.labels == (LabelSpec("Car", ("car", "automobile", "van")), LabelSpec("Person", ("Person",)))


def test_brush_and_polygon_on_one_image_ignore_other_controls():
    spec = parse_label_config(BOTH)
    assert [(t.from_name, t.kind, t.values) for t in spec.targets] == [
        ("brush", "brush", ("cat", "sky")),
        ("poly", "polygon", ("cat", "car")),
    ]
    assert spec.vocabulary == ("cat", "sky", "car")
    assert spec.names("cat") == ("cat", "kitten")
    assert spec.target("poly").kind == "polygon"
    with pytest.raises(KeyError, match="box-only"):
        spec.names("box-only")
    with pytest.raises(KeyError, match="box"):
        spec.target("box")


def test_synonyms_blank_and_repeated_fall_back_sensibly():
    xml = """<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i">
      <Label value="tree" predicted_values=" , "/>
      <Label value="road" predicted_values="road,street,road , street"/>
    </BrushLabels></View>"""
    assert parse_label_config(xml).targets[0].labels == (
        LabelSpec("tree", ("tree",)),
        LabelSpec("road", ("road", "street")),
    )


def test_several_images_and_a_control_on_two_images():
    xml = """<View>
      <Image name="left" value="$left"/>
      <Image name="right" value="$right_url"/>
      <Text name="caption" value="$caption"/>
      <BrushLabels name="bl" toName="left,right"><Label value="a"/></BrushLabels>
      <PolygonLabels name="pr" toName="right"><Label value="b"/></PolygonLabels>
      <BrushLabels name="on_text" toName="caption"><Label value="c"/></BrushLabels>
    </View>"""
    spec = parse_label_config(xml)
    assert [(t.from_name, t.to_name, t.image_key) for t in spec.targets] == [
        ("bl", "left", "left"),
        ("bl", "right", "right_url"),
        ("pr", "right", "right_url"),
    ]
    assert spec.image_keys == ("left", "right_url")
    assert spec.vocabulary == ("a", "b")
    assert spec.target("bl", "right").image_key == "right_url"
    assert [(t.from_name, t.to_name) for t in spec.predicted_targets] == [("bl", "left")]  # the first image's


def test_special_characters_and_alias():
    xml = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
      <Label value="traffic light &amp; sign"/>
      <Label value="&lt;unknown&gt;" predicted_values="thing, &quot;stuff&quot;"/>
      <Label value="Ünïcode 猫"/>
      <Label value="Potted plant" alias="plant"/>
    </BrushLabels></View>"""
    labels = parse_label_config(xml).targets[0].labels
    assert labels == (
        LabelSpec("traffic light & sign", ("traffic light & sign",)),
        LabelSpec("<unknown>", ("thing", '"stuff"')),
        LabelSpec("Ünïcode 猫", ("Ünïcode 猫",)),
        LabelSpec("plant", ("Potted plant",)),  # results carry the alias, the model reads the text
    )


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Text name='t' value='$text'/></View>", r'add e\.g\. <Image name="image" value="\$image"/>'),
        ("<View><Image name='i' value='https://x/y.jpg'/></View>", r"no <Image> tag"),
        (
            "<View><Image name='i' value='$image'/><RectangleLabels name='r' toName='i'>"
            "<Label value='a'/></RectangleLabels></View>",
            r"no <BrushLabels> or <PolygonLabels> control pointing at an <Image>.*add e\.g\. <BrushLabels",
        ),
        (
            "<View><Image name='i' value='$image'/><Text name='t' value='$t'/>"
            "<BrushLabels name='b' toName='t'><Label value='a'/></BrushLabels></View>",
            r"no <BrushLabels> or <PolygonLabels> control pointing at an <Image>",
        ),
        (
            "<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'/></View>",
            r"<BrushLabels name='b'> has no <Label> children; add e\.g\. <Label value=\"cat\"/>",
        ),
        ("<View><Image name='i' value='$image'/>", r"not valid XML"),
        ("not xml at all", r"not valid XML"),
        ("", r"non-empty XML string"),
        (None, r"non-empty XML string"),
        (b"<View/>", r"non-empty XML string"),
    ],
)
def test_unusable_configs_say_what_to_add(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_error_is_a_value_error():
    assert issubclass(LabelConfigError, ValueError)


def test_empty_control_is_skipped_when_another_is_usable():
    xml = """<View><Image name='i' value='$image'/><BrushLabels name='empty' toName='i'/>
      <PolygonLabels name='p' toName='i'><Label value='a'/></PolygonLabels></View>"""
    assert [t.from_name for t in parse_label_config(xml).targets] == ["p"]


def test_parsing_is_cached_and_results_are_immutable():
    labeling._parse.cache_clear()
    first = parse_label_config(BRUSH)
    again = parse_label_config(BRUSH)
    assert again is first
    assert labeling._parse.cache_info().hits == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.targets = ()  # type: ignore[misc]
    assert isinstance(first.targets, tuple) and isinstance(first.targets[0].labels, tuple)


def test_public_surface():
    assert sorted(labeling.__all__) == [
        "LabelConfigError", "LabelSpec", "LabelingSpec", "Target", "label_interface", "parse_label_config",
    ]  # fmt: skip
