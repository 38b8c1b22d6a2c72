"""`labelstudio-maskclip doctor` without Label Studio: the backend's own machine, the verdict, the output.

Against a real Label Studio (address block on and off): tests/test_connect.py.
"""

from __future__ import annotations

import json

import pytest

from labelstudio_maskclip.cli import main
from labelstudio_maskclip.commands.doctor import (
    Finding,
    _allowed_ranges,
    blocks_preannotation,
    check_label_studio,
    check_model_dir,
    check_weights,
    render,
)
from labelstudio_maskclip.commands.network import LOOPBACK
from labelstudio_maskclip.settings import Settings
from tests.fake_label_studio import FakeLabelStudio, Request
from tests.labelstudio import free_port
from tests.tiny import TINY_VIT


def test_weights_that_load_name_model_device_and_precision(weights):
    found = check_weights(Settings(model=TINY_VIT, pretrained=str(weights), device="cpu"))
    assert found[0].status == "ok" and not blocks_preannotation(found)
    assert "MaskCLIP-Tiny-ViT" in found[0].message and "cpu" in found[0].message and "float32" in found[0].message


def test_weights_that_cannot_load_block_and_name_the_setting(tmp_path):
    found = check_weights(Settings(model=TINY_VIT, pretrained=str(tmp_path / "missing.pt"), device="cpu"))
    assert blocks_preannotation(found)
    assert "MASKCLIP_PRETRAINED" in found[0].message and "local checkpoint" in found[0].fix


def test_model_dir_writable_and_store_healthy(tmp_path):
    found = check_model_dir(Settings(model_dir=str(tmp_path / "md")))
    assert [f.status for f in found] == ["ok"] and "healthy" in found[0].message
    assert "no annotations stored yet" in found[0].message and "MaskCLIP" in found[0].message


def test_a_postgresql_store_is_checked_where_the_url_points(tmp_path, postgres_url, postgres):
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.training import checkpoints as ck

    Store(postgres_url).put_state(ck.SERVED_KEY, "maskclip+-4")
    found = check_model_dir(Settings(model_dir=str(tmp_path / "md"), store_url=postgres_url))
    assert [f.status for f in found] == ["ok"] and "serving maskclip+-4" in found[0].message
    assert not (tmp_path / "md" / "annotations.sqlite3").exists()
    gone = f"postgresql://maskclip:pw@/postgres?host={postgres.root}&port={postgres.port + 1}"
    found = check_model_dir(Settings(model_dir=str(tmp_path / "md"), store_url=gone))
    assert [f.status for f in found] == ["warn"] and "MASKCLIP_STORE_URL" in found[0].message
    assert "MASKCLIP_STORE_URL" in found[0].fix and "pw" not in found[0].message


def test_model_dir_that_cannot_be_written_is_a_warning_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    found = check_model_dir(Settings(model_dir=str(blocker / "model_dir")))
    assert [f.status for f in found] == ["warn"] and not blocks_preannotation(found)
    assert "not writable" in found[0].message and "MODEL_DIR" in found[0].fix


def test_damaged_store_is_reported(tmp_path):
    from labelstudio_maskclip.learning.store import Store

    store = Store(tmp_path)
    conn = store._conn()
    conn.execute("PRAGMA foreign_keys = OFF")  # what a half-copied or hand-edited file can look like
    conn.execute("INSERT INTO masks (annotation_id, label, source, height, width, area, counts) "
                 "VALUES (99, 'x', 'brush', 1, 1, 1, '')")  # fmt: skip
    store.close()
    found = check_model_dir(Settings(model_dir=str(tmp_path)))
    assert found[0].status == "warn" and "damaged" in found[0].message and "backfill" in found[0].fix
    assert "annotations.sqlite3 and its -wal/-shm files aside" in found[0].fix


def test_a_damaged_postgresql_store_gets_advice_for_a_database_not_a_file(tmp_path, postgres_url):
    import psycopg

    from labelstudio_maskclip.learning.store import Store

    Store(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no foreign keys: what a bad restore can leave
        conn.execute("INSERT INTO masks (annotation_id, label, source, height, width, area, counts) "
                     "VALUES (99, 'x', 'brush', 1, 1, 1, '')")  # fmt: skip
    found = check_model_dir(Settings(model_dir=str(tmp_path / "md"), store_url=postgres_url))
    assert found[0].status == "warn" and "damaged" in found[0].message and "backfill" in found[0].fix
    assert "sqlite" not in found[0].fix and "PostgreSQL database" in found[0].fix
    sqlite_found = check_model_dir(Settings(model_dir=str(tmp_path / "md")))
    assert sqlite_found[0].status == "ok"


def test_label_studio_missing_or_unreachable_blocks():
    found, api = check_label_studio(Settings())
    assert api is None and blocks_preannotation(found) and "LABEL_STUDIO_URL is not set" in found[0].message
    url = f"http://127.0.0.1:{free_port()}"
    found, api = check_label_studio(Settings(label_studio_url=url, label_studio_api_key="x"))
    assert api is None and blocks_preannotation(found) and url in found[0].message


def test_what_to_allow_for_an_address():
    assert _allowed_ranges(["127.0.0.1"]) == list(LOOPBACK)
    assert _allowed_ranges(["10.1.2.3", "::1"]) == ["10.1.2.3/32", *LOOPBACK]
    assert _allowed_ranges(["93.184.216.34"]) == []


def test_render_says_what_blocks_and_shows_each_fix():
    findings = [
        Finding("weights", "ok", "loaded"),
        Finding("webhook", "warn", "missing", "add it"),
        Finding("address block", "fail", "refused", "line one\nline two"),
    ]
    text = render(findings)
    assert "[FAIL] address block: refused" in text and "fix: line one" in text and "            line two" in text
    assert "Pre-annotation is blocked: fix address block" in text
    assert "should work" in render(findings[:2]) and "in order" in render(findings[:1])


def test_cli_exit_status_and_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md"))
    assert main(["doctor", "--no-weights"]) == 1  # no LABEL_STUDIO_URL
    assert "LABEL_STUDIO_URL is not set" in capsys.readouterr().out
    assert main(["doctor", "--no-weights", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["blocked"] is True and {f["topic"] for f in report["findings"]} >= {"model dir", "Label Studio"}


class _FakeLabelStudio:
    """The fake Label Studio answering the address probes (POST) by path with (status, detail), and the
    package's client (``api``) talking to it."""

    def __init__(self, answers: dict[str, tuple[int, str]]):
        from labelstudio_maskclip.fetching.images import ImageFetcher
        from labelstudio_maskclip.labelstudio.api import LabelStudioAPI

        self.answers = answers
        self.posted: list[dict] = []
        self.fake = FakeLabelStudio(self.answer)
        self.api = LabelStudioAPI(ImageFetcher(self.fake.url, "a" * 40, allow_private=True))

    def answer(self, request: Request) -> None:
        self.posted.append(request.data())
        status, detail = self.answers[request.route]
        request.json(status, {"detail": detail})


@pytest.fixture
def answering():
    """``answering({path: (status, detail)})``: a :class:`_FakeLabelStudio`, closed after the test."""
    made: list[_FakeLabelStudio] = []
    yield lambda answers: made.append(_FakeLabelStudio(answers)) or made[-1]
    for one in made:
        one.fake.close()


BLOCKED = (403, "URL resolves to a reserved network address (block: 127.0.0.0/8)")
PASSED = (400, "Validation error")


@pytest.mark.parametrize(
    ("ml", "hook", "status", "words"),
    [(BLOCKED, BLOCKED, "fail", "Label Studio refuses http://127.0.0.1:9090: Connect Model: 403 URL resolves"),
     (PASSED, BLOCKED, "warn", "may call http://127.0.0.1:9090 as an ML backend but refuses its webhook"),
     (PASSED, PASSED, "ok", "is in 127.0.0.0/8, which Label Studio blocks by default; this Label Studio accepts it"),
     ((500, "Can't resolve hostname x"), PASSED, "fail", "cannot use http://127.0.0.1:9090: Can't resolve")],
)  # fmt: skip
def test_address_verdict_comes_from_label_studio_and_names_the_fix(ml, hook, status, words, answering):
    from labelstudio_maskclip.commands.doctor import check_address
    from labelstudio_maskclip.commands.network import LABEL_STUDIO_SETTINGS

    ls = answering({"/api/ml": ml, "/api/webhooks/": hook})
    [finding] = check_address(Settings(), ls.api, "http://127.0.0.1:9090", given=True)
    assert finding.status == status and words in finding.message
    assert all(p["project"] == 0 for p in ls.posted)  # no real project: Label Studio creates nothing
    if status != "ok" and ml[0] != 500:
        for name, value in LABEL_STUDIO_SETTINGS["same machine"].items():
            assert f"{name}={value}" in finding.fix


def test_a_refusal_names_the_label_studio_setting_that_holds_the_range(answering):
    from labelstudio_maskclip.commands.doctor import check_address

    ls = answering({"/api/ml": BLOCKED, "/api/webhooks/": BLOCKED})
    [finding] = check_address(Settings(), ls.api, "http://127.0.0.1:9090", given=False)
    assert "Label Studio blocks 127.0.0.0/8: the range is in its built-in list, on while " in finding.message
    assert "USE_DEFAULT_BANNED_SUBNETS is true (the default), or USER_ADDITIONAL_BANNED_SUBNETS" in finding.message
    own = (403, "URL resolves to a reserved network address (block: 93.184.216.0/24)")  # an operator's range
    ls = answering({"/api/ml": own, "/api/webhooks/": own})
    [finding] = check_address(Settings(), ls.api, "http://93.184.216.34:9090", given=True)
    assert "Label Studio blocks 93.184.216.0/24: the range is in USER_ADDITIONAL_BANNED_SUBNETS" in finding.message
    assert "USE_DEFAULT" not in finding.message


SMART = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>
  <TextArea name="prompt" toName="image"/>
  <BrushLabels name="tag" toName="image"><Label value="Car"/></BrushLabels>
</View>"""


def test_interactive_mode_is_judged_against_the_configs_smart_tools():
    from labelstudio_maskclip.commands.doctor import check_interactive, prompt_tools

    tools = prompt_tools(SMART)
    assert tools == ["<KeyPointLabels name='click'>", "<TextArea name='prompt'>"]  # the box is not smart
    assert prompt_tools("<View><Image name='i' value='$i'/></View>") == [] and prompt_tools("not xml") == []
    on = check_interactive(True, tools)
    assert on.status == "ok" and "send clicks, boxes and phrases to this backend" in on.message
    assert "ignores" not in on.message and "Auto-Annotation in the bottom bar" in on.fix
    off = check_interactive(False, tools)
    assert off.status == "warn" and "they send nothing" in off.message and "Interactive preannotations" in off.fix
    assert check_interactive(True, []).status == "note"
    assert check_interactive(False, []).message.startswith("interactive pre-annotation is off")


def test_a_live_model_version_that_is_not_ours_is_reported_with_where_to_change_it():
    from labelstudio_maskclip.commands.doctor import check_live_version

    served = "maskclip-ViT-B-16.openai-naclip"
    for following in ("", None, served, "MaskCLIP"):  # the backend's title: the dropdown's "Models: MaskCLIP"
        assert check_live_version(following, served, ["MaskCLIP"]) == []
    [old] = check_live_version("maskclip-ViT-B-16.openai-maskclip", served, ["MaskCLIP"])
    assert old.status == "note" and "while " + served + " is served now" in old.message
    [other] = check_live_version("yolo-v8", served, ["MaskCLIP"])
    assert other.status == "warn" and "'yolo-v8', which is not this backend's" in other.message
    assert "Settings -> Annotation -> Prelabeling: pick 'Models: MaskCLIP'" in other.fix
    assert f"'Predictions: {served}'" in other.fix
